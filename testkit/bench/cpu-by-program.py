#!/usr/bin/env python3
"""Which programs the CPU went to in each arm of a `quarry-bench` run: runs the bench under
`perf record` (every CPU, cpu-clock sampling, which needs no hardware counters), notes the
monotonic time of each "calibration before ARM" line the bench prints, then prints, per arm,
the CPU-seconds of each program (a process's name; rustc's threads counted as rustc), the busiest
first. Unlike /proc snapshots it sees the short-lived processes (rustc, cargo, build scripts,
quarry-confine) that come and go between markers.

    python3 testkit/bench/cpu-by-program.py target/release/quarry-bench check --real --crates 40

Needs perf (Debian's linux-perf) and permission to sample every CPU (root)."""

import collections
import os
import re
import subprocess
import sys
import tempfile
import time

FREQUENCY = 199


def program(comm):
    """A thread's name as the program it belongs to: rustc names its worker threads."""
    if comm.startswith(("opt cgu", "LLVM", "rustc", "coordinator", "cgu.")):
        return "rustc"
    if comm.startswith(("tokio-runtime", "quarry-bench")):
        return "quarry-bench (consumers, registry)"
    return comm


def main():
    data = tempfile.NamedTemporaryFile(prefix="cpu-by-program-", suffix=".data", delete=False).name
    perf = subprocess.Popen(
        ["perf", "record", "-q", "-a", "-k", "mono", "-e", "cpu-clock", "-F", str(FREQUENCY),
         "-o", data],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(1)
    bench = subprocess.Popen(sys.argv[1:], stderr=subprocess.PIPE, text=True)
    marks = []
    for line in bench.stderr:
        sys.stderr.write(line)
        if line.startswith("calibration before "):
            arm = line[len("calibration before "):].split(":")[0]
            marks.append((time.monotonic(), arm))
        elif line.startswith("arm finished: "):
            marks.append((time.monotonic(), None))
    bench.wait()
    marks.append((time.monotonic(), None))
    perf.send_signal(2)
    perf.wait()
    script = subprocess.run(
        ["perf", "script", "-i", data, "-F", "comm,pid,tid,time,ip,dso"],
        capture_output=True, text=True, check=True,
    ).stdout
    if os.environ.get("KEEP_PERF_DATA"):
        print(f"perf data: {data}", file=sys.stderr)
    else:
        os.unlink(data)
    per_arm = collections.defaultdict(collections.Counter)
    per_object = collections.defaultdict(collections.Counter)
    # The processes a program ran as, by pid: those sampled at least once (at 199 Hz, nearly
    # every rustc; it says whether an arm compiled more units, not only longer ones).
    processes = collections.defaultdict(set)
    # Busy samples per tenth of each arm: where in an arm CPUs sat idle (its start, its tail).
    tenths = collections.defaultdict(lambda: [0.0] * 10)
    for line in script.splitlines():
        # "COMM PID/TID TIME: IP (DSO)" where COMM may hold spaces. A thread's own name, not
        # its process's first: a pid keeps its number across exec (quarry-confine becomes rustc).
        match = re.match(r"\s*(.*?)\s+(\d+)/(\d+)\s+([\d.]+):\s+\S+\s+\((.*)\)$", line)
        if not match:
            continue
        name = program(match.group(1))
        at = float(match.group(4))
        for (start, arm), (end, _) in zip(marks, marks[1:]):
            if arm is not None and start <= at < end:
                per_arm[arm][name] += 1 / FREQUENCY
                per_object[(arm, name)][os.path.basename(match.group(5))] += 1 / FREQUENCY
                processes[(arm, name)].add(match.group(2))
                if name != "swapper":
                    tenths[arm][min(9, int(10 * (at - start) / (end - start)))] += 1 / FREQUENCY
                break
    for _, arm in marks[:-1]:
        if arm is None:
            continue
        counts = per_arm[arm]
        busy = sum(v for k, v in counts.items() if k != "swapper")
        print(f"== {arm}: {busy:.1f} CPU-s busy")
        start, end = next((s, e) for (s, a), (e, _) in zip(marks, marks[1:]) if a == arm)
        print(f"   {end - start:.1f} s from the calibration to the arm's end")
        tenth = (end - start) / 10
        print("   CPUs busy per tenth of the arm: " + " ".join(
            f"{seconds / tenth:.2f}" for seconds in tenths[arm]))
        for name, seconds in counts.most_common(16):
            if name != "swapper" and seconds >= 0.5:
                objects = ", ".join(
                    f"{dso} {share:.1f}"
                    for dso, share in per_object[(arm, name)].most_common(3)
                )
                seen = len(processes[(arm, name)])
                print(f"   {seconds:8.1f}  {name}  [{seen} processes]  ({objects})")
    sys.exit(bench.returncode)


if __name__ == "__main__":
    main()
