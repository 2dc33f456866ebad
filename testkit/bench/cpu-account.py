#!/usr/bin/env python3
"""Where the CPU goes during `quarry-bench dispatch`: runs the given command, snapshots every
process's CPU time (and that of the children it reaped) at the bench's phase markers, and prints
the busiest processes of the pipeline phase and of the `xargs` phase.

    python3 testkit/bench/cpu-account.py target/release/quarry-bench dispatch --jobs 1000

Reads /proc only; Linux. Processes that exit between markers are counted through the parent
that reaped them ("(reaped children)")."""

import collections
import os
import subprocess
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")


def snapshot():
    per = collections.Counter()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            data = open(f"/proc/{pid}/stat").read()
        except OSError:
            continue
        comm = data[data.index("(") + 1 : data.rindex(")")]
        if comm.startswith("kworker"):
            # A kernel worker's name changes with its work: one bucket for all of them.
            comm = "kworker (kernel work queues)"
        fields = data[data.rindex(")") + 2 :].split()
        utime, stime, cutime, cstime = (int(fields[i]) for i in (11, 12, 13, 14))
        per[comm] += utime + stime
        per[comm + " (reaped children)"] += cutime + cstime
    cpu = open("/proc/stat").readline().split()[1:]
    total = sum(int(x) for x in cpu)
    idle = int(cpu[3]) + int(cpu[4])
    return per, total, idle, time.time()


def report(before, after, label):
    (pa, ta, ia, t0), (pb, tb, ib, t1) = before, after
    busy = (tb - ta - (ib - ia)) / HZ
    print(f"== {label}: {t1 - t0:.1f} s wall, {busy:.1f} s CPU busy (all cores), {(ib - ia) / HZ:.1f} s idle")
    spent = {name: (ticks - pa.get(name, 0)) / HZ for name, ticks in pb.items()}
    for name, seconds in sorted(spent.items(), key=lambda kv: -kv[1])[:12]:
        if seconds > 0.05:
            print(f"   {seconds:7.2f} s  {name}")


def main():
    bench = subprocess.Popen(
        sys.argv[1:], stderr=subprocess.PIPE, text=True, env=dict(os.environ, RUST_LOG="warn")
    )
    marks = {}
    for line in bench.stderr:
        sys.stderr.write(line)
        if "pipeline: starting the run" in line:
            marks["start"] = snapshot()
        elif line.startswith("pipeline:"):
            marks["pipeline"] = snapshot()
        elif line.startswith("xargs"):
            marks["bare"] = snapshot()
    bench.wait()
    report(marks["start"], marks["pipeline"], "pipeline")
    report(marks["pipeline"], marks["bare"], "xargs")


if __name__ == "__main__":
    main()
