#!/bin/bash
# Regenerates the golden outputs from the installed qemu-storage-daemon and qemu-nbd:
#   Tests/InteropTests/cli/make-golden.sh
# Each case (one per line, arguments separated by tabs, @DIR@ a scratch directory, @EMPTY@ an
# empty argument) is run in a
# directory holding r.raw (16 MiB raw), d.qcow2 (64 MiB qcow2) and keys.psk (a PSK key file
# for user alice, for tls-creds-psk with dir=@DIR@); the block records the
# arguments, the exit status and stderr, with the scratch directory written back as @DIR@.
set -u
here=$(cd "$(dirname "$0")" && pwd)
dir=$(mktemp -d /tmp/cli-golden-XXXXXX)
trap 'rm -rf "$dir"' EXIT
qemu-img create -q -f raw "$dir/r.raw" 16M
qemu-img create -q -f qcow2 "$dir/d.qcow2" 64M
printf 'alice:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n' > "$dir/keys.psk"
run() {   # tool cases-file output-file
    local tool=$1 cases=$2 out=$3
    : > "$out"
    while IFS= read -r line; do
        line=${line//@DIR@/$dir}
        IFS=$'\t' read -r -a args <<< "$line"
        [ -z "$line" ] && args=()
        for i in "${!args[@]}"; do [ "${args[$i]}" = @EMPTY@ ] && args[$i]=""; done
        err=$(cd "$dir" && timeout 5 "$tool" "${args[@]}" </dev/null 2>&1 >/dev/null)
        rc=$?
        rm -f "$dir"/*.sock "$dir"/*.pid
        { printf '$'; printf ' %s' "${args[@]}"; printf '\nexit %d\n%s\n\n' "$rc" "$err"; } | sed "s|$dir|@DIR@|g" >> "$out"
    done < "$cases"
}
run qemu-storage-daemon "$here/qsd-cases.txt" "$here/qsd-7.2.expected.txt"
run qemu-nbd "$here/qemu-nbd-cases.txt" "$here/qemu-nbd-7.2.expected.txt"
