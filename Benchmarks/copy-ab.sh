#!/usr/bin/env bash
# A/B of blockd builds (or settings) on one nbdcopy row, in one run: the variants take turns
# (round robin, ROUNDS rounds) so load changes on a shared machine hit them alike, and the
# medians are printed side by side. Run by hand; see README.md.
#
#   Benchmarks/copy-ab.sh ROW 'LABEL|BINARY[|VAR=value]...' ...
#   ROUNDS=5 TRANSPORT=tcp Benchmarks/copy-ab.sh raw-out 'old|/tmp/blockd-old' 'new|.build/release/blockd'
#   Benchmarks/copy-ab.sh raw-out 'w16|.build/release/blockd' 'w4|.build/release/blockd|BLOCKD_ARGS=--workers 4'
#
# Each turn is one Benchmarks/copy-profile.sh run (MODE=count, REPEAT=1, fresh server).
# Compare server CPU per GiB first: throughput moves with the neighbours' load.
set -euo pipefail
cd "$(dirname "$0")/.."
ROW=${1:?usage: copy-ab.sh ROW 'LABEL|BINARY[|VAR=value]...' ...}
shift
[ $# -ge 1 ] || { echo "copy-ab.sh: give at least one variant" >&2; exit 2; }
ROUNDS=${ROUNDS:-5}
OUT=$(mktemp /tmp/copy-ab.XXXXXX)
trap 'rm -f "$OUT"' EXIT

echo "copy-ab: $ROW ${TRANSPORT:-unix}, $ROUNDS rounds, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for r in $(seq "$ROUNDS"); do
  for spec in "$@"; do
    IFS='|' read -r -a parts <<<"$spec"
    label=${parts[0]}; bin=${parts[1]}
    envs=("BLOCKD=$bin" "REPEAT=1" "MODE=count")
    for ((i = 2; i < ${#parts[@]}; i++)); do envs+=("${parts[$i]}"); done
    text=$(env "${envs[@]}" Benchmarks/copy-profile.sh blockd "$ROW" 2>&1) || { echo "$text" >&2; exit 1; }
    mibs=$(awk '/MiB\/s/ {print $2; exit}' <<<"$text")
    cpu=$(sed -nE 's/.*task-clock ([0-9]+) ms.*/\1/p' <<<"$text")
    faults=$(awk '/page faults\/MiB/ {print $3}' <<<"$text")
    cs=$(awk '/ctx switches\/MiB/ {print $3}' <<<"$text")
    load=$(cut -d' ' -f1 /proc/loadavg)
    echo "$label $r $mibs $cpu $faults $cs $load" >> "$OUT"
    printf '  %-12s round %d: %5s MiB/s, %4s ms CPU/GiB, %6s faults/MiB, %5s ctx switches/MiB, load %s\n' \
      "$label" "$r" "$mibs" "$cpu" "$faults" "$cs" "$load" >&2
  done
done
/usr/bin/python3 - "$OUT" "$@" <<'PYEOF'
import sys, statistics, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    label, r, mibs, cpu, faults, cs, load = line.split()
    rows[label].append((float(mibs), float(cpu), float(faults), float(cs), float(load)))
labels = [s.split("|")[0] for s in sys.argv[2:]]
print(f"{'variant':14}{'MiB/s':>8}{'CPU ms/GiB':>12}{'(min-max)':>12}{'faults/MiB':>12}{'ctxsw/MiB':>11}{'load':>7}")
base = None
for l in labels:
    v = rows[l]; med = lambda i: statistics.median(x[i] for x in v)
    cpus = [x[1] for x in v]
    rel = "" if base is None else f"  CPU {100 * (med(1) / base - 1):+.0f}%"
    if base is None: base = med(1)
    print(f"{l:14}{med(0):8.0f}{med(1):12.0f}{f'{min(cpus):.0f}-{max(cpus):.0f}':>12}{med(2):12.2f}{med(3):11.1f}{med(4):7.1f}{rel}")
PYEOF
