"""Time ``d2mae demo`` end to end, with what the machine did meanwhile (CPU model, load, the host's steal time), and
set its own up-front estimate beside the measurement.

On a virtual machine the host can take the cores away ("steal"): the same demo on the same kind of machine ran
3 min 58 s and 5 min 20 s within three hours. This script runs the demo once into a fresh folder (``--keep DIR``, or a
temporary one) and prints the wall time, each stage's time from the demo's log, the share of CPU time the host stole
from the machine during the run (``/proc/stat``), the load average before it, and the CPU model, so that a slow run
can be told apart from a slow machine. The demo's printed estimate ("Estimated time: …") and each stage's
(``timings.csv``) are set beside the measured times, with the ratio.

    python benchmarks/demo_time.py                      # the installed d2mae, into a temporary folder
    python benchmarks/demo_time.py --json-out demo-time.json --keep /tmp/demo
    python benchmarks/demo_time.py --busy 1             # with another process holding a core meanwhile

Run it on an otherwise idle machine (``--busy N`` adds N pure-Python busy loops, started before the demo and
stopped after it).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGE = re.compile(r"^\[experiment\] \[\d+/\d+\] (.+): done in (?:(\d+) min )?(\d+) s$")
ESTIMATE = re.compile(r"^Estimated time: (?:(\d+) h )?(?:(\d+) min )?(?:(\d+) s )?on this machine")


def stage_seconds(line: str) -> tuple[str, int] | None:
    """(stage, seconds) of a ``[experiment] [i/n] STAGE: done in [M min ]S s`` line, else None."""
    m = STAGE.match(line)
    if m is None:
        return None
    mins, s = (int(v or 0) for v in m.groups()[1:])
    return m.group(1), 60 * mins + s


def estimate_seconds(line: str) -> int | None:
    """Seconds of the plan's ``Estimated time: [H h ][M min ][S s ]on this machine …`` line, else None."""
    m = ESTIMATE.match(line)
    if m is None:
        return None
    h, mins, s = (int(v or 0) for v in m.groups())
    return 3600 * h + 60 * mins + s


def cpu_times() -> list[int]:
    """The machine's CPU time counters (``/proc/stat``'s first line: user … steal), in clock ticks."""
    return [int(v) for v in open("/proc/stat").readline().split()[1:9]]


def cpu_model() -> str:
    return next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d2mae", default=str(Path(sys.executable).with_name("d2mae")), help="the d2mae executable")
    ap.add_argument("--keep", default=None, metavar="DIR", help="run into DIR (must not exist) and keep it")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more demo flags (e.g. --quick)")
    ap.add_argument("--busy", type=int, default=0, metavar="N", help="busy loops running beside the demo")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    if args.keep and Path(args.keep).exists():
        ap.error(f"--keep {args.keep} exists: a demo there would reuse its finished stages; name a new folder")
    tmp = None if args.keep else tempfile.mkdtemp(prefix="d2mae-demo-")
    out = Path(args.keep) if args.keep else Path(tmp) / "demo"
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    time.sleep(2.0 if busy else 0.0)  # the loops show in the run queue before the demo looks
    try:
        load, started = os.getloadavg(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        before, t0 = cpu_times(), time.perf_counter()
        proc = subprocess.run([args.d2mae, "demo", "--out", str(out), *args.extra], capture_output=True, text=True)
        wall, after = time.perf_counter() - t0, cpu_times()
    finally:
        for b in busy:
            b.kill()
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"d2mae demo failed with status {proc.returncode}")
    delta = [a - b for a, b in zip(after, before)]
    log = (proc.stderr + "\n" + proc.stdout).splitlines()
    stages = [st for st in map(stage_seconds, log) if st]
    estimate = next((e for e in map(estimate_seconds, log) if e is not None), None)
    timings = out / "timings.csv"
    per_stage = ([(r["stage"], float(r["estimate_s"] or "nan"), float(r["seconds"]))
                  for r in csv.DictReader(timings.open())] if timings.is_file() else [])
    result = {"cpu": cpu_model(), "cores": os.cpu_count(), "load_before": load, "busy_loops": args.busy,
              "wall_s": wall, "estimate_s": estimate, "steal_share": delta[7] / max(1, sum(delta)),
              "stages": stages, "stage_estimates": per_stage, "started_utc": started}
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"# {result['cpu']}, {result['cores']} cores, load average {load[0]:.2f} before, {args.busy} busy "
          f"loop(s), started {started}")
    print(f"d2mae demo: {int(wall // 60)} min {wall % 60:.0f} s wall; the host stole "
          f"{100 * result['steal_share']:.1f}% of the machine's CPU time meanwhile")
    if estimate:
        print(f"its estimate: {int(estimate // 60)} min {estimate % 60:.0f} s = {estimate / wall:.2f} × the wall "
              f"time ({'within' if abs(estimate / wall - 1) <= 0.2 else 'NOT within'} ±20%)")
    for name, est, seconds in per_stage:
        print(f"  {seconds:6.1f} s  (estimate {est:6.1f} s, {est / max(seconds, 1e-9):.2f}×)  {name}")
    if not per_stage:
        for name, seconds in stages:
            print(f"  {seconds:4d} s  {name}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
