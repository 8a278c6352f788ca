#!/usr/bin/env python3
"""Prints the results of a suite run (scripts/suites/*.sh) as Markdown tables.

    report.py --suite NAME [--check FILE] RESULTS_DIR MODE...

RESULTS_DIR/MODE.tsv holds one line per test run: test, mode, status (pass, fail, skip, error),
seconds, the programs the test started (space separated), a note. The first table has one row
per test with its status in each mode; the second the totals of each mode, each blockd mode
next to QEMU's totals for the same tests; then every test whose status differs from QEMU's.

--check FILE compares blockd's results with FILE, lines of `TEST MODE STATUS` (# comments): a
test expected to pass that does not is a regression (exit 1), and so is an expected test that
did not run; a test that now does better is reported so the file can be updated.
"""
import argparse
import os
import sys

NAMES = {"qemu": "QEMU", "blockd-nbd": "blockd as qemu-nbd", "blockd-qsd": "blockd as QSD"}
MARK = {"pass": "pass", "fail": "**FAIL**", "skip": "skip", "error": "**ERROR**"}


def load(results, mode):
    rows = {}
    path = os.path.join(results, f"{mode}.tsv")
    if not os.path.exists(path):
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            parts += [""] * (6 - len(parts))
            test, _, status, secs, started, note = parts[:6]
            rows[test] = {"status": status, "secs": float(secs or 0), "started": started, "note": note}
    return rows


def counts(rows, tests):
    c = {"pass": 0, "fail": 0, "skip": 0, "error": 0}
    for t in tests:
        c[rows[t]["status"]] = c.get(rows[t]["status"], 0) + 1
    return c


def fmt_counts(c):
    text = f"{c['pass']} pass, {c['fail']} fail, {c['skip']} skip"
    return text + (f", {c['error']} error" if c.get("error") else "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", required=True)
    ap.add_argument("--check")
    ap.add_argument("--counted-only", action="store_true",
                    help="rows only for tests that started qemu-nbd or QSD and no VM in QEMU's run")
    ap.add_argument("results")
    ap.add_argument("modes", nargs="+")
    args = ap.parse_args()

    data = {m: load(args.results, m) for m in args.modes}
    order = list(data[args.modes[0]])
    for m in args.modes:
        order += [t for t in data[m] if t not in order]

    out = []
    if args.counted_only and "qemu" in data:
        order, skipped = split_counted(data, order)
        for m in args.modes:
            data[m] = {t: r for t, r in data[m].items() if t in order}
        out.append(f"### {args.suite}: tests left out\n")
        out += [f"- {k}: {len(v)}" for k, v in skipped.items()]
        out.append("")
    out.append(f"### {args.suite}: results per test\n")
    head = "| test | starts | " + " | ".join(NAMES[m] for m in args.modes) + " | seconds |"
    out.append(head)
    out.append("|" + "---|" * (len(args.modes) + 3))
    for t in order:
        first = next(data[m][t] for m in args.modes if t in data[m])
        cells = []
        for m in args.modes:
            r = data[m].get(t)
            if r is None:
                cells.append("")
                continue
            cell = MARK.get(r["status"], r["status"])
            if r["note"]:
                cell += f" ({r['note']})"
            if m != "qemu" and r["started"] and not blockd_ran(m, r["started"]):
                cell += " (blockd not started)"
            cells.append(cell)
        secs = " / ".join(f"{data[m][t]['secs']:.1f}" for m in args.modes if t in data[m])
        started = data["qemu"][t]["started"] if "qemu" in data and t in data["qemu"] else first["started"]
        out.append(f"| {t} | {started or '—'} | " + " | ".join(cells) + f" | {secs} |")

    out.append(f"\n### {args.suite}: totals\n")
    out.append("| run | tests | result | QEMU on the same tests | seconds |")
    out.append("|---|---|---|---|---|")
    for m in args.modes:
        tests = list(data[m])
        if not tests:
            continue
        secs = sum(data[m][t]["secs"] for t in tests)
        same = ""
        if m != "qemu" and "qemu" in data:
            same = fmt_counts(counts(data["qemu"], [t for t in tests if t in data["qemu"]]))
        out.append(f"| {NAMES[m]} | {len(tests)} | {fmt_counts(counts(data[m], tests))} | {same} | {secs:.0f} |")

    diffs = []
    for m in args.modes:
        if m == "qemu" or "qemu" not in data:
            continue
        for t, r in data[m].items():
            q = data["qemu"].get(t)
            if q and q["status"] != r["status"]:
                diffs.append(f"- {t}: QEMU {q['status']}, {NAMES[m]} {r['status']}")
    out.append(f"\n### {args.suite}: differences from QEMU ({len(diffs)})\n")
    out += diffs or ["none"]
    print("\n".join(out))

    if args.check:
        return check(args.check, data)
    return 0


def split_counted(data, order):
    """The tests that started qemu-nbd or QSD without a VM in QEMU's run; the rest by reason."""
    counted, skipped = [], {
        "needed qemu-system (a virtual machine)": [],
        "not run with QEMU's programs (format, protocol or a requirement)": [],
        "ran without starting qemu-nbd or qemu-storage-daemon": [],
    }
    reasons = list(skipped)
    for t in order:
        r = data["qemu"].get(t)
        if r is None:
            counted.append(t)
            continue
        progs = r["started"].split()
        if "qemu-system" in progs:
            skipped[reasons[0]].append(t)
        elif "qemu-nbd" in progs or "qemu-storage-daemon" in progs:
            counted.append(t)
        elif r["status"] == "skip":
            skipped[reasons[1]].append(t)
        else:
            skipped[reasons[2]].append(t)
    return counted, skipped


def blockd_ran(mode, started):
    want = "qemu-nbd" if mode == "blockd-nbd" else "qemu-storage-daemon"
    return want in started.split()


def check(path, data):
    bad, better = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].split()
            if not line:
                continue
            test, mode, want = line
            if "/" in test:  # iotests: CONFIG/TEST is the report's "TEST (CONFIG)"
                config, name = test.split("/", 1)
                test = f"{name} ({config})"
            r = data.get(mode, {}).get(test)
            if r is None:
                bad.append(f"{test} ({mode}) did not run")
            elif want == "pass" and r["status"] != "pass":
                bad.append(f"{test} ({mode}): expected pass, got {r['status']}")
            elif want != "pass" and r["status"] == "pass":
                better.append(f"{test} ({mode}) passes now (expected {want}): update {path}")
    for b in better:
        print(f"suites: {b}", file=sys.stderr)
    for b in bad:
        print(f"suites: regression: {b}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
