# Shared by scripts/suites/libnbd.sh and scripts/suites/iotests.sh (sourced, not run).
#
# The public test suites written for qemu-nbd and qemu-storage-daemon run three ways in one run:
#   qemu        QEMU's qemu-nbd and qemu-storage-daemon (the reference),
#   blockd-nbd  blockd in qemu-nbd's place (QEMU's qemu-storage-daemon stays),
#   blockd-qsd  blockd in qemu-storage-daemon's place (QEMU's qemu-nbd stays).
# Each program is reached through a small wrapper in a bin directory put first on PATH (and
# named by QEMU_NBD_PROG/QSD_PROG for the iotests). The wrapper records which test started it
# (from its process ancestry) and then execs the real program under the name it was called by,
# so blockd sees argv[0] = .../qemu-nbd and is qemu-nbd's front end. The records decide which
# tests each blockd mode runs (those that started the program it replaces in QEMU's run) and
# show that a blockd run really ran blockd.

set -euo pipefail

SUITES_SCRIPTS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SUITES_SCRIPTS/../.." && pwd)
# Sources, builds and results. SUITES_SRC may point at already unpacked sources.
SUITES_DIR=${SUITES_DIR:-${XDG_CACHE_HOME:-${HOME:-/var/tmp}/.cache}/blockd-suites}
SUITES_SRC=${SUITES_SRC:-$SUITES_DIR/src}
SUITES_BUILD=${SUITES_BUILD:-$SUITES_DIR/build}
SUITES_RESULTS=${SUITES_RESULTS:-$SUITES_DIR/results}
QEMU_NBD_BIN=${QEMU_NBD_BIN:-/usr/bin/qemu-nbd}
QSD_BIN=${QSD_BIN:-/usr/bin/qemu-storage-daemon}
MODES_ALL="qemu blockd-nbd blockd-qsd"
# The wrappers stop walking their ancestry at the script that runs the suite.
export SUITES_ROOT_PID=$$

say() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; }
die() { say "$*"; exit 1; }

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# Installs the Debian packages named when missing.
need_packages() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Makes sure apt has deb-src lines (Debian 12 keeps its sources in debian.sources).
enable_deb_src() {
  local f=/etc/apt/sources.list.d/debian.sources
  if [ -f "$f" ] && grep -q '^Types: deb$' "$f"; then
    say "adding deb-src to $f"
    as_root sed -i 's/^Types: deb$/Types: deb deb-src/' "$f"
    as_root apt-get update -qq
  elif ! grep -rqs '^deb-src\|^Types:.*deb-src' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    die "no deb-src lines in the apt sources: add them, or set SUITES_SRC to unpacked sources"
  fi
}

# ensure_source PACKAGE VERSION DIRNAME: unpacks `apt-get source PACKAGE=VERSION` into
# $SUITES_SRC unless $SUITES_SRC/DIRNAME exists. Prints the directory.
ensure_source() {
  local package=$1 version=$2 dir=$3
  if [ ! -d "$SUITES_SRC/$dir" ]; then
    need_packages dpkg-dev
    enable_deb_src
    mkdir -p "$SUITES_SRC"
    say "fetching the sources of $package $version"
    (cd "$SUITES_SRC" && apt-get source -qq "$package=$version" >/dev/null)
    [ -d "$SUITES_SRC/$dir" ] || die "apt-get source $package=$version made no $SUITES_SRC/$dir"
  fi
  echo "$SUITES_SRC/$dir"
}

# Builds blockd (release) unless BLOCKD names a binary. Prints the binary's path.
ensure_blockd() {
  if [ -n "${BLOCKD:-}" ]; then
    [ -x "$BLOCKD" ] || die "BLOCKD=$BLOCKD is not an executable"
    echo "$BLOCKD"
    return
  fi
  (cd "$REPO" && swift build -c release --product blockd >&2)
  echo "$REPO/.build/release/blockd"
}

# make_bindir DIR MODE BLOCKD: the wrappers qemu-nbd and qemu-storage-daemon for MODE, and a
# qemu-system-x86_64 that only answers `-machine help` (the iotests harness asks it once) and
# otherwise records the call and fails: tests that need a virtual machine are left out.
make_bindir() {
  local dir=$1 mode=$2 blockd=$3 nbd=$QEMU_NBD_BIN qsd=$QSD_BIN
  case $mode in
    qemu) ;;
    blockd-nbd) nbd=$blockd ;;
    blockd-qsd) qsd=$blockd ;;
    *) die "unknown mode $mode" ;;
  esac
  rm -rf "$dir"; mkdir -p "$dir"
  write_wrapper "$dir/qemu-nbd" qemu-nbd "$nbd"
  write_wrapper "$dir/qemu-storage-daemon" qemu-storage-daemon "$qsd"
  cat > "$dir/qemu-system-x86_64" <<'EOF'
#!/bin/bash
if [ "$*" = "-machine help" ]; then exit 0; fi
if [ -n "${SUITES_STARTS:-}" ]; then
  chain=""; p=$PPID
  for _ in 1 2 3 4 5 6 7 8 9 10 11 12; do
    [ "$p" -gt 1 ] 2>/dev/null && [ "$p" != "${SUITES_ROOT_PID:-}" ] && [ -r "/proc/$p/cmdline" ] || break
    chain+=" $(tr '\0\t\n' '   ' < "/proc/$p/cmdline")"
    p=$(sed 's/.*) //' "/proc/$p/stat" | cut -d' ' -f2)
  done
  printf '%s\t%s\t%s\n' qemu-system $$ "$chain" >> "$SUITES_STARTS"
fi
echo "qemu-system-x86_64: not installed (this run covers tests without a virtual machine)" >&2
exit 1
EOF
  chmod +x "$dir/qemu-system-x86_64"
}

write_wrapper() {
  local path=$1 name=$2 target=$3
  cat > "$path" <<EOF
#!/bin/bash
# $name for the test suites: records the test that started it, then runs $target.
if [ -n "\${SUITES_STARTS:-}" ]; then
  chain=""; p=\$PPID
  for _ in 1 2 3 4 5 6 7 8 9 10 11 12; do
    [ "\$p" -gt 1 ] 2>/dev/null && [ "\$p" != "\${SUITES_ROOT_PID:-}" ] && [ -r "/proc/\$p/cmdline" ] || break
    chain+=" \$(tr '\\0\\t\\n' '   ' < "/proc/\$p/cmdline")"
    p=\$(sed 's/.*) //' "/proc/\$p/stat" | cut -d' ' -f2)
  done
  printf '%s\\t%s\\t%s\\n' $name \$\$ "\$chain" >> "\$SUITES_STARTS"
fi
exec -a "\$0" "$target" "\$@"
EOF
  chmod +x "$path"
}

# reap_leftovers STARTS: ends (and reports) programs a test run left running. The wrapper's
# pid is the program's pid (exec), so the records name them.
reap_leftovers() {
  local starts=$1 prog pid _ left=0 i
  [ -f "$starts" ] || return 0
  while IFS=$'\t' read -r prog pid _; do
    [ "$prog" = qemu-system ] && continue
    # A test's cleanup may have signalled it just now: give it 5 s to exit.
    for i in $(seq 50); do
      kill -0 "$pid" 2>/dev/null && grep -qa -e qemu-nbd -e qemu-storage-daemon "/proc/$pid/cmdline" 2>/dev/null \
        || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null && grep -qa -e qemu-nbd -e qemu-storage-daemon "/proc/$pid/cmdline" 2>/dev/null; then
      say "left running after the tests: $prog pid $pid ($(tr '\0' ' ' < "/proc/$pid/cmdline"))"
      printf '%s\t%s\n' "$prog" "$pid" >> "${starts%.starts}.leftovers"
      kill "$pid" 2>/dev/null || true
      left=1
    fi
  done < "$starts"
  [ $left -eq 0 ] || sleep 1
  while IFS=$'\t' read -r prog pid _; do
    kill -0 "$pid" 2>/dev/null && grep -qa -e qemu-nbd -e qemu-storage-daemon "/proc/$pid/cmdline" 2>/dev/null \
      && kill -9 "$pid" 2>/dev/null || true
  done < "$starts"
}

# programs_started STARTS: the programs recorded in STARTS, space separated.
programs_started() {
  [ -f "$1" ] || return 0
  cut -f1 "$1" | sort -u | tr '\n' ' ' | sed 's/ $//'
}

# Parses the mode list given with --modes (comma separated).
parse_modes() {
  local m
  for m in ${1//,/ }; do
    case " $MODES_ALL " in *" $m "*) ;; *) die "unknown mode '$m' (modes: $MODES_ALL)" ;; esac
  done
  echo "${1//,/ }"
}
