#!/usr/bin/env bash
# Makes the TLS credentials the tests and Benchmarks/tls.sh use, with certtool and psktool
# (Debian gnutls-bin), in QEMU's and libnbd's file layout:
#
#   OUT/pki/         ca-cert.pem server-cert.pem server-key.pem client-cert.pem client-key.pem
#                    (CA "blockd test CA"; the server certificate is for localhost, 127.0.0.1, ::1;
#                    client DN as QEMU compares it: "C=US,O=blockd tests,CN=client1")
#   OUT/pki2/        the same CA, a second client ("C=US,O=blockd tests,CN=client2")
#   OUT/rogue/       another CA ("rogue CA") with its own server and client certificates
#   OUT/psk/keys.psk      user "alice" (and "bob")
#   OUT/psk-wrong/keys.psk  user "alice" with a different key
#
# Both the server (QEMU tls-creds dir=OUT/pki, endpoint=server) and the clients (libnbd
# tls-certificates=OUT/pki, QEMU endpoint=client) read the same directory.
#
#   scripts/make-pki.sh OUT [rsa|ecdsa]     (default ecdsa: quick to generate)
set -euo pipefail
out=${1:?usage: make-pki.sh OUT [rsa|ecdsa]}
keytype=${2:-ecdsa}
mkdir -p "$out"/pki "$out"/pki2 "$out"/rogue "$out"/psk "$out"/psk-wrong
cd "$out"

key() { certtool --generate-privkey --key-type="$keytype" --outfile "$1" 2>/dev/null; chmod 0600 "$1"; }
ca() {  # $1 = dir, $2 = common name
  key "$1/ca-key.pem"
  printf 'cn = %s\nca\ncert_signing_key\nexpiration_days = 3650\n' "$2" > "$1/ca.info"
  certtool --generate-self-signed --load-privkey "$1/ca-key.pem" --template "$1/ca.info" \
           --outfile "$1/ca-cert.pem" 2>/dev/null
}
signed() {  # $1 = CA dir, $2 = out dir, $3 = server|client, $4 = template text
  key "$2/$3-key.pem"
  printf '%s\nexpiration_days = 3650\n' "$4" > "$2/$3.info"
  certtool --generate-certificate --load-ca-certificate "$1/ca-cert.pem" --load-ca-privkey "$1/ca-key.pem" \
           --load-privkey "$2/$3-key.pem" --template "$2/$3.info" --outfile "$2/$3-cert.pem" 2>/dev/null
}
server_info='organization = blockd tests
cn = localhost
dns_name = localhost
ip_address = 127.0.0.1
ip_address = ::1
tls_www_server
encryption_key
signing_key'
client_info() { printf 'country = US\norganization = blockd tests\ncn = %s\ntls_www_client\nencryption_key\nsigning_key' "$1"; }

ca pki "blockd test CA"
signed pki pki server "$server_info"
signed pki pki client "$(client_info client1)"
cp pki/ca-cert.pem pki2/ca-cert.pem
signed pki pki2 client "$(client_info client2)"
ca rogue "rogue CA"
signed rogue rogue server "$server_info"
signed rogue rogue client "$(client_info client1)"
rm -f ./*/*.info

psktool -u alice -p psk/keys.psk >/dev/null
psktool -u bob -p psk/keys.psk >/dev/null
psktool -u alice -p psk-wrong/keys.psk >/dev/null
