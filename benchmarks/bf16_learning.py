"""Does bf16 autocast change what pre-training learns? The same D²MAE run in fp32 and in bf16, over several seeds.

Each (precision, seed) is one ``d2mae pretrain`` on the same images with busbra-cpu's model and recipe (ViT-Tiny/16
at 96 px, decoder 128 × 2, batch 64, lr 1e-3, warm-up 6 epochs of the full run), cut at ``--steps`` optimizer steps
(the lr schedule fitted to the shorter run). The loss logged every 10 steps is compared:

- per logged step, whether the bf16 seeds' mean lies inside the range of the fp32 seeds (the spread of seeds), and
  the reverse;
- the final loss (mean of the last ``--tail`` logged values) per run, with Welch's t-test of bf16 against fp32
  (scipy).

    python benchmarks/bf16_learning.py --out /tmp/bf16-learning                   # BUS-BRA, 3 seeds, 1000 steps
    python benchmarks/bf16_learning.py --out /tmp/x --steps 40 --seeds 0 1 --data DIR   # a quick look

Runs ``--parallel`` processes at a time with ``--threads`` threads each; finished runs (``model.safetensors``) are
reused, so a stopped comparison continues. Prints a Markdown table; ``--json`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from scipy import stats

REPO = Path(__file__).resolve().parents[1]
BUSBRA = REPO.parent / "shared" / "data" / "bus-bra" / "images"
MODEL = ["--arch", "vit_tiny_patch16", "--img-size", "96", "--decoder-embed-dim", "128", "--decoder-depth", "2",
         "--decoder-num-heads", "4", "--batch-size", "64", "--lr", "1e-3", "--warmup-epochs", "6", "--epochs", "60",
         "--log-every-steps", "10", "--preset", "d2mae"]


def run_one(args: argparse.Namespace, precision: str, seed: int) -> Path:
    out = Path(args.out) / f"{precision}-seed{seed}"
    if not (out / "model.safetensors").is_file():
        cmd = [sys.executable, "-m", "d2mae", "pretrain", "--data", str(args.data), "--out", str(out), *MODEL,
               "--max-steps", str(args.steps), "--precision", precision, "--seed", str(seed),
               "--threads", str(args.threads), "--no-progress", "--resume"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def curve(folder: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {int(r["step"]): float(r["loss"]) for r in rows if "loss" in r and int(r["step"]) % 10 == 0}


def compare(curves: dict[str, list[dict[int, float]]], tail: int) -> dict[str, Any]:
    steps = sorted(set.intersection(*(set(c) for runs in curves.values() for c in runs)))
    inside = {"bf16_in_fp32": 0, "fp32_in_bf16": 0}
    gaps, spreads = [], []
    for s in steps:
        f = [c[s] for c in curves["fp32"]]
        b = [c[s] for c in curves["bf16"]]
        inside["bf16_in_fp32"] += min(f) <= statistics.mean(b) <= max(f)
        inside["fp32_in_bf16"] += min(b) <= statistics.mean(f) <= max(b)
        gaps.append(abs(statistics.mean(b) - statistics.mean(f)))
        spreads.append(max(f) - min(f))
    final = {p: [statistics.mean(c[s] for s in steps[-tail:]) for c in runs] for p, runs in curves.items()}
    welch = stats.ttest_ind(final["bf16"], final["fp32"], equal_var=False)
    return {"logged_steps": len(steps), "last_step": steps[-1], **{k: v / len(steps) for k, v in inside.items()},
            "mean_gap": statistics.mean(gaps), "mean_fp32_spread": statistics.mean(spreads), "final": final,
            "welch_t": float(welch.statistic), "welch_p": float(welch.pvalue)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the runs (reused when they finished)")
    ap.add_argument("--data", default=str(BUSBRA), help="images (default: BUS-BRA beside the repository)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parallel", type=int, default=2, help="runs at a time")
    ap.add_argument("--tail", type=int, default=5, help="logged values averaged into the final loss")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    jobs = [(p, s) for s in args.seeds for p in ("fp32", "bf16")]
    with ThreadPoolExecutor(args.parallel) as pool:
        folders = list(pool.map(lambda job: run_one(args, *job), jobs))
    curves: dict[str, list[dict[int, float]]] = {"fp32": [], "bf16": []}
    for (p, _), folder in zip(jobs, folders):
        curves[p].append(curve(folder))
    r = compare(curves, args.tail)
    fmt = lambda v: ", ".join(f"{x:.4f}" for x in v)  # noqa: E731
    print(f"| | fp32 | bf16 |\n|---|---|---|\n"
          f"| final loss per seed {args.seeds} (mean of the last {args.tail} logged values, to step "
          f"{r['last_step']}) | {fmt(r['final']['fp32'])} | {fmt(r['final']['bf16'])} |\n"
          f"| mean of the seeds | {statistics.mean(r['final']['fp32']):.4f} | "
          f"{statistics.mean(r['final']['bf16']):.4f} |\n\n"
          f"Logged steps where the bf16 seeds' mean lies inside the fp32 seeds' range: "
          f"{100 * r['bf16_in_fp32']:.0f}% (the reverse: {100 * r['fp32_in_bf16']:.0f}%) of {r['logged_steps']}; "
          f"mean |bf16 − fp32| of the seed means {r['mean_gap']:.4f} against a mean fp32 seed range of "
          f"{r['mean_fp32_spread']:.4f}; final loss bf16 vs fp32: Welch t = {r['welch_t']:.2f}, "
          f"P = {r['welch_p']:.3f}.")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **r}, indent=1))
    return r


if __name__ == "__main__":
    main()
