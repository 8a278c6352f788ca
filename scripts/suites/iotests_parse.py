#!/usr/bin/env python3
"""Turns the output of one iotests `check` run into report.py's lines (see report.py).

    iotests_parse.py --config CFG --mode MODE --iotests DIR --starts FILE --leftovers FILE
                     --scratch DIR TEST... < check-output (CR turned into LF)

A test's status line is "NAME STATUS [start] [end] SECONDSs (last: …) DESCRIPTION" with STATUS
pass, fail or "not run" (a skip). The programs a test started come from the wrappers' records
(FILE --starts): each names its ancestors' command lines, among them the test's own path. A
failing test's .out.bad is kept next to the results.
"""
import argparse
import os
import re
import shutil
import sys

LINE = re.compile(r"^(\S+)\s+(pass|fail|not run)\s+\[[\d:]+\]\s+\[[\d:]+\]\s+(\S+)\s+(\(last: [^)]*\))?\s*(.*)$")
STATUS = {"pass": "pass", "fail": "fail", "not run": "skip"}


def main():
    ap = argparse.ArgumentParser()
    for a in ("config", "mode", "iotests", "starts", "leftovers", "scratch"):
        ap.add_argument("--" + a, required=True)
    ap.add_argument("tests", nargs="*")
    args = ap.parse_args()

    results = {}
    for line in sys.stdin:
        m = LINE.match(line.rstrip("\n"))
        if m:
            name, status, secs, _, desc = m.groups()
            secs = secs.rstrip("s")
            results[name] = (STATUS[status], float(secs) if secs not in ("...", "") else 0.0, desc.strip())

    root = os.path.realpath(args.iotests) + "/"
    started = {}
    if os.path.exists(args.starts):
        with open(args.starts, encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) < 3:
                    continue
                prog, pid, chain = parts[:3]
                for token in chain.split():
                    if token.startswith(root):
                        started.setdefault(token[len(root):], {})[prog] = pid
                        break
    left = set()
    if os.path.exists(args.leftovers):
        with open(args.leftovers, encoding="utf-8") as f:
            left = {line.split("\t")[1].strip() for line in f if "\t" in line}

    keep = os.path.join(os.path.dirname(args.starts), args.config)
    for test in args.tests:
        status, secs, desc = results.get(os.path.basename(test), ("error", 0.0, "no result from check"))
        progs = started.get(test, {})
        notes = []
        if status == "skip":
            notes.append(desc[:70])
        elif status == "fail":
            notes.append("exit status" + desc.split("exit status", 1)[1] if "exit status" in desc else "output differs")
            bad = os.path.join(args.scratch, os.path.basename(test) + ".out.bad")
            if os.path.exists(bad):
                os.makedirs(keep, exist_ok=True)
                shutil.copy(bad, os.path.join(keep, os.path.basename(test) + ".out.bad"))
        if any(pid in left for pid in progs.values()):
            notes.append("left running")
        print("\t".join([f"{test} ({args.config})", args.mode, status, f"{secs:.1f}",
                         " ".join(sorted(progs)), "; ".join(n for n in notes if n)]))


if __name__ == "__main__":
    main()
