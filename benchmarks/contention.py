"""Pre-training on a busy CPU: images/s idle and beside one CPU-bound competitor, per thread wait policy, one run.

Each policy runs in its own subprocess (OpenMP reads its wait policy when PyTorch loads it): the same pre-training
steps as ``d2mae pretrain`` (``Pretrainer.train_step``: ``configs/busbra-cpu.yaml``'s ViT-Tiny at 96 px, 2-block
128-wide decoder, batch 64, memory data path), first alone, then while one other process spins on one core (a
pure-Python busy loop, as a browser tab or a neighbour's job would). With two cores and one competitor the fair share
is 50% of the idle speed; the bar is 40%.

    python benchmarks/contention.py                          # BUS-BRA beside the repository, else synthetic images
    python benchmarks/contention.py --rounds 3 --json-out benchmarks/results/contention.json

Run it on an otherwise idle machine: the competitor is the only other load it may see.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

#: (name, environment, threads): libgomp's default (spins before it sleeps); d2mae's choice (runtime/threads.py:
#: PASSIVE when other tasks are runnable as the command starts, else libgomp's default); always sleeping; one thread
POLICIES = [
    ("libgomp default (spin)", {}, None),
    ("d2mae (chosen at start)", {"D2MAE_BENCH_POLICY": "d2mae"}, None),
    ("OMP_WAIT_POLICY=PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}, None),
    ("1 thread", {}, 1),
]


def worker(args: argparse.Namespace) -> None:
    """Time pre-training steps in this process and print one JSON line."""
    from d2mae.runtime.threads import wait_policy_environment

    chosen = wait_policy_environment() if os.environ.get("D2MAE_BENCH_POLICY") == "d2mae" else {}  # as the CLI does
    import torch

    from d2mae.data.sources import find_images
    from d2mae.runtime.distributed import DistContext
    from d2mae.runtime.threads import configure_threads
    from d2mae.train.pretrain import Pretrainer
    from d2mae.train.pretrain_config import make_config

    threads = configure_threads(args.threads)
    refs = find_images([args.data])[:args.n_images]
    import tempfile
    import types

    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_config(data=refs, out=str(Path(tmp) / "run"), arch="vit_tiny_patch16", img_size=96,
                          decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4, batch_size=64, mean=[0.3],
                          std=[0.2], device="cpu", precision="fp32", data_path="memory", epochs=1000,
                          warmup_epochs=0, checkpoint_every_steps=0, log_every_steps=10**6, tensorboard="off")
        run = Pretrainer(cfg, DistContext(), torch.device("cpu"))
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            run.setup()
        stop = types.SimpleNamespace(signum=None)
        batches = run.batches.epoch(0, 0)

        def step() -> None:
            nonlocal batches
            if run.micro >= run.micro_per_epoch:
                run.epoch, run.micro = run.epoch + 1, 0
                batches = run.batches.epoch(run.epoch, 0)
            run.train_step(run.epoch, batches, stop)

        for _ in range(2):
            step()
        steps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            step()
            steps += 1
        seconds = time.perf_counter() - t0
    print(json.dumps({"images_per_s": steps * 64 / seconds, "steps": steps, "threads": threads, "policy": chosen}))


def competitor() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def measure(env: dict[str, str], threads: int | None, args: argparse.Namespace) -> tuple[float, dict]:
    cmd = [sys.executable, __file__, "--worker", "--data", args.data, "--seconds", str(args.seconds),
           "--n-images", str(args.n_images)] + (["--threads", str(threads)] if threads else [])
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME",
                                                              "OMP_NUM_THREADS")}
    out = subprocess.run(cmd, env={**clean, **env}, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return float(result["images_per_s"]), result["policy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "bus-bra" / "images"))
    ap.add_argument("--n-images", type=int, default=320)
    ap.add_argument("--seconds", type=float, default=10.0, help="timed seconds per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over the policies (medians are reported)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if not Path(args.data).is_dir():
        from d2mae.data.phantom import generate_phantoms

        args.data = str(Path(generate_phantoms(Path("/tmp/d2mae-contention"), n=args.n_images, size=400)).parent
                        / "images")
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    samples: dict[str, dict[str, list[float]]] = {name: {"idle": [], "busy": []} for name, _, _ in POLICIES}
    chosen: dict[str, dict[str, dict]] = {name: {} for name, _, _ in POLICIES}
    for r in range(args.rounds):  # rounds interleave the policies: slow drifts of the host hit every row alike
        for name, env, threads in POLICIES:
            idle, chosen[name]["idle"] = measure(env, threads, args)
            proc = competitor()
            try:
                time.sleep(1.0)
                busy, chosen[name]["busy"] = measure(env, threads, args)
            finally:
                proc.kill()
                proc.wait()
            samples[name]["idle"].append(idle)
            samples[name]["busy"].append(busy)
            print(f"round {r + 1}: {name:28s} idle {idle:7.1f} img/s   busy {busy:7.1f} img/s", flush=True)
    rows = []
    for name, _, _ in POLICIES:
        idle, busy = statistics.median(samples[name]["idle"]), statistics.median(samples[name]["busy"])
        rows.append({"policy": name, "idle_images_per_s": round(idle, 1), "busy_images_per_s": round(busy, 1),
                     "busy_over_idle": round(busy / idle, 3), "idle_samples": samples[name]["idle"],
                     "busy_samples": samples[name]["busy"], "set_idle": chosen[name]["idle"],
                     "set_busy": chosen[name]["busy"]})
        print(f"median: {name:28s} idle {idle:7.1f} img/s   busy {busy:7.1f} img/s   busy/idle {busy / idle:.2f}")
    report = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "date": time.strftime("%Y-%m-%d"),
              "seconds_per_measurement": args.seconds, "rounds": args.rounds, "rows": rows,
              "command": "python benchmarks/contention.py " + " ".join(sys.argv[1:])}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
