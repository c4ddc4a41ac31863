"""The reference MAE pipeline at its best setting, against d2mae, on 1 and 2 pinned cores (issue 23, part 2).

For each core count C (the process pinned with ``taskset``), the reference is run with W = 0, 1 and 2 DataLoader
workers and C − W torch threads (at least 1), so that no core is oversubscribed when it can be avoided, and with each
allocator setting (``kept``: freed memory stays in the process, as the d2mae command line sets it; ``default``:
glibc's own rules; the two sides share the process, so both get the setting of the run); d2mae runs with C threads.
Each setting is one ``speed_vs_reference.py`` run with alternating rounds (the two sides take turns, so other load
hits both alike). Every setting is reported; the headline ratio is d2mae against the
reference's fastest setting on the same cores, both measured in that setting's run.

    python benchmarks/fair_reference.py                       # 512 BUS-BRA images, 3 rounds × 10 steps
    python benchmarks/fair_reference.py --cores 1 2 --workers 0 1 2 --allocators kept default --json-out fair.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_setting(cores: int, workers: int, allocator: str, args: argparse.Namespace) -> dict:
    """One speed_vs_reference.py run pinned to the first ``cores`` CPUs."""
    ref_threads = max(1, cores - workers)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        cmd = ["taskset", "-c", ",".join(str(c) for c in range(cores)), sys.executable,
               str(HERE / "speed_vs_reference.py"), "--threads", str(cores), "--ref-threads", str(ref_threads),
               "--ref-workers", str(workers), "--rounds", str(args.rounds), "--steps", str(args.steps),
               "--warm", str(args.warm), "--breakdown-steps", "0", "--allocator", allocator, "--json-out", str(out)]
        if args.n_images:
            cmd += ["--n-images", str(args.n_images)]
        for flag in ("data", "batch_size", "img_size"):
            if getattr(args, flag) is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(cores)},
                       stdout=subprocess.DEVNULL if args.quiet else None)
        result = json.loads(out.read_text())
    return {"cores": cores, "workers": workers, "ref_threads": ref_threads, "allocator": allocator,
            "reference_img_s": result["reference_img_s"],
            "d2mae_img_s": result["d2mae_img_s"], "ratio": result["ratio"],
            "round_ratios": [r["ratio"] for r in result["rounds"]], "machine": result["machine"]}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cores", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--allocators", nargs="+", default=["kept", "default"], choices=["kept", "default"])
    ap.add_argument("--n-images", type=int, default=512)
    ap.add_argument("--data", default=None, help="image folder (default: BUS-BRA beside the repository)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--img-size", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warm", type=int, default=2)
    ap.add_argument("--quiet", action="store_true", help="only the summary table")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    rows = [run_setting(c, w, a, args) for c in args.cores for w in args.workers for a in args.allocators]
    print(f"\n# {rows[0]['machine']}")
    print("| cores | reference workers | reference threads | allocator | reference img/s | d2mae img/s | "
          "ratio (rounds) |")
    print("|---:|---:|---:|---|---:|---:|---|")
    for r in rows:
        print(f"| {r['cores']} | {r['workers']} | {r['ref_threads']} | {r['allocator']} | "
              f"{r['reference_img_s']:.1f} | {r['d2mae_img_s']:.1f} | {r['ratio']:.2f}× "
              f"({', '.join(f'{x:.2f}' for x in r['round_ratios'])}) |")
    for c in args.cores:
        best = max((r for r in rows if r["cores"] == c), key=lambda r: r["reference_img_s"])
        print(f"\n**{c} core(s): the reference's best setting is {best['workers']} worker(s) × {best['ref_threads']} "
              f"thread(s), allocator {best['allocator']}, {best['reference_img_s']:.1f} img/s; d2mae in that run "
              f"{best['d2mae_img_s']:.1f} img/s: "
              f"{best['ratio']:.2f}× the reference at its best.**")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
