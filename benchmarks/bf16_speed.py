"""bf16 autocast against fp32 for a D²MAE pre-training step on this CPU, each against its own limit.

For each model, a fresh process builds the step of ``roofline.py`` (the memory data path's crops of real images,
the per-sample blur, forward, backward, fused AdamW) and times it in fp32 and in bf16 as ``d2mae pretrain`` runs it
(``d2mae.runtime.device.autocast``: forward and loss under bf16 autocast with attention on SDPA's math kernels,
backward outside), and, for the record, under ``torch.autocast`` alone (attention on the CPU flash kernels in bf16,
as before issue 35), rotating the three in rounds. Each dtype's **limit** is the sum of the step's matrix products and attention calls, each timed alone
at its recorded shapes and dtype (``roofline.isolated_limit``): bf16's limit is bf16 products, fp32's fp32 products.
Two-thread steps differ from process to process (about one process in four runs near its one-thread speed), so
every model runs in ``--processes`` processes and the table gives the median and the range over them.

    python benchmarks/bf16_speed.py                                 # the three models of issue 35, 3 processes each
    python benchmarks/bf16_speed.py --models demo busbra-cpu        # the demo's model too
    python benchmarks/bf16_speed.py --models busbra-cpu --processes 1 --rounds 2 --steps 2
    python benchmarks/bf16_speed.py --json benchmarks/results/bf16-speed-DATE.json

Prints a Markdown table (speed-up = fp32 step / bf16 step; "of limit" = the dtype's limit / its step).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import roofline  # noqa: E402  (adds the repository's src to the path)
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from d2mae.runtime.device import autocast, cpu_has_bf16  # noqa: E402
from d2mae.runtime.machine import machine_info  # noqa: E402
from d2mae.runtime.memory import keep_freed_memory  # noqa: E402

#: name → (timm architecture, image size, decoder width, decoder depth, decoder heads, batch)
MODELS: dict[str, tuple[str, int, int, int, int, int]] = {
    "demo": ("vit_tiny_patch16", 64, 128, 2, 4, 32),
    "busbra-cpu": ("vit_tiny_patch16", 96, 128, 2, 4, 64),
    "vit-s": ("vit_small_patch16", 224, 256, 4, 8, 16),
    "vit-b": ("vit_base_patch16", 224, 512, 8, 16, 8),
}
LABELS = {"demo": "demo: ViT-Tiny/16, 64 px, decoder 128 × 2, batch 32",
          "busbra-cpu": "busbra-cpu: ViT-Tiny/16, 96 px, decoder 128 × 2, batch 64",
          "vit-s": "ViT-S/16, 224 px, decoder 256 × 4, batch 16",
          "vit-b": "ViT-B/16, 224 px, decoder 512 × 8, batch 8"}


def step_args(name: str, args: argparse.Namespace) -> argparse.Namespace:
    arch, size, width, depth, heads, batch = MODELS[name]
    return argparse.Namespace(model=arch, img_size=size, decoder_embed_dim=width, decoder_depth=depth,
                              decoder_num_heads=heads, batch_size=batch, data=args.data, n_images=args.n_images)


#: what each timed side runs: fp32; bf16 as d2mae runs it (runtime.device.autocast: attention on SDPA's math
#: kernels); bf16 under torch.autocast alone (attention on the CPU flash kernels in bf16: before issue 35)
MODES = ("fp32", "bf16", "bf16-flash")


def cast(mode: str) -> Any:
    if mode == "fp32":
        return contextlib.nullcontext()
    if mode == "bf16":
        return autocast(torch.device("cpu"), torch.bfloat16)
    return torch.autocast("cpu", dtype=torch.bfloat16)


def timed_step(model: Any, optimizer: Any, cache: Any, g: torch.Generator, batch: int, mode: str) -> float:
    """One step (roofline.one_step's parts), the forward and loss under ``mode``'s autocast; seconds."""
    cfg = model.config
    t0 = time.perf_counter()
    x = cache.batch(torch.randint(0, len(cache), (batch,), generator=g), g)  # [B, 1, S, S]
    t = model.schedule.sample(batch, generator=g)  # [B]
    noise = torch.rand(batch, cfg.num_patches, generator=g)  # [B, N]
    with cast(mode):
        loss, _, _ = model(x, t, noise=noise)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One process: the model's step in every mode, alternating, and each mode's limit."""
    keep_freed_memory()  # as the command line does
    torch.set_num_threads(args.threads)
    sa = step_args(name, args)
    with tempfile.TemporaryDirectory() as tmp:
        refs = roofline.images_for(sa, Path(tmp))
        model, optimizer, cache = roofline.build(sa, refs)
        g = torch.Generator().manual_seed(1)
        for mode in MODES:
            for _ in range(args.warmup):
                timed_step(model, optimizer, cache, g, sa.batch_size, mode)
        times: dict[str, list[float]] = {m: [] for m in MODES}
        for r in range(args.rounds):  # rotate which mode goes first
            for mode in MODES[r % 3:] + MODES[:r % 3]:
                times[mode] += [timed_step(model, optimizer, cache, g, sa.batch_size, mode) for _ in range(args.steps)]
        out: dict[str, Any] = {"model": name, "threads": args.threads}
        for mode in MODES:
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                timed_step(model, optimizer, cache, g, sa.batch_size, mode)
            lim = roofline.isolated_limit(prof, args.repeats) if mode != "bf16-flash" else None
            step = statistics.median(times[mode])
            out[mode] = {"step_s": step, "steps_s": times[mode], "limit_s": lim["limit_s"] if lim else None,
                         "of_limit": lim["limit_s"] / step if lim else None,
                         "product_dtypes": lim["dtypes"] if lim else None}
    out["speedup"] = out["fp32"]["step_s"] / out["bf16"]["step_s"]
    out["speedup_flash"] = out["fp32"]["step_s"] / out["bf16-flash"]["step_s"]
    return out


def run_processes(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    runs = []
    for _ in range(args.processes):
        cmd = [sys.executable, __file__, "--child", name, "--threads", str(args.threads), "--rounds", str(args.rounds),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
               "--n-images", str(args.n_images)] + (["--data", args.data] if args.data else [])
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = runs[-1]
        print(f"  {name}: fp32 {1000 * r['fp32']['step_s']:.0f} ms, bf16 {1000 * r['bf16']['step_s']:.0f} ms "
              f"({r['speedup']:.2f}×), bf16 with flash attention {1000 * r['bf16-flash']['step_s']:.0f} ms",
              file=sys.stderr, flush=True)
    return runs


def summary(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med_range(values: list[float]) -> tuple[float, float, float]:
        return statistics.median(values), min(values), max(values)

    return {"model": name, "processes": len(runs),
            "speedup": med_range([r["speedup"] for r in runs]),
            "speedup_flash": med_range([r["speedup_flash"] for r in runs]),
            **{f"{d}_step_s": med_range([r[d]["step_s"] for r in runs]) for d in MODES},
            **{f"{d}_limit_s": med_range([r[d]["limit_s"] for r in runs]) for d in ("fp32", "bf16")},
            **{f"{d}_of_limit": med_range([r[d]["of_limit"] for r in runs]) for d in ("fp32", "bf16")}}


def table(rows: list[dict[str, Any]], goals: dict[str, float | None]) -> str:
    def ms(v: tuple[float, float, float]) -> str:
        return f"{1000 * v[0]:,.0f} ({1000 * v[1]:,.0f}–{1000 * v[2]:,.0f})"

    def pct(v: tuple[float, float, float]) -> str:
        return f"{100 * v[0]:.0f}% ({100 * v[1]:.0f}–{100 * v[2]:.0f})"

    def x(v: tuple[float, float, float]) -> str:
        return f"{v[0]:.2f}× ({v[1]:.2f}–{v[2]:.2f})"

    lines = ["| step | fp32 step, ms | fp32 limit, ms | fp32 of limit | bf16 step, ms | bf16 limit, ms | "
             "bf16 of limit | speed-up | bf16 with flash attention (before) | goal |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        goal = goals[r["model"]]
        verdict = "—" if goal is None else f"≥ {goal}×: {'met' if r['speedup'][0] >= goal else 'NOT met'}"
        lines.append(f"| {LABELS[r['model']]} | {ms(r['fp32_step_s'])} | {ms(r['fp32_limit_s'])} | "
                     f"{pct(r['fp32_of_limit'])} | {ms(r['bf16_step_s'])} | {ms(r['bf16_limit_s'])} | "
                     f"{pct(r['bf16_of_limit'])} | **{x(r['speedup'])}** | {ms(r['bf16-flash_step_s'])}: "
                     f"{x(r['speedup_flash'])} | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["busbra-cpu", "vit-s", "vit-b"], choices=list(MODELS))
    ap.add_argument("--processes", type=int, default=3, help="fresh processes per model (median and range)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=int, default=3, help="alternating fp32/bf16 rounds per process")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per dtype per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="timings of each isolated product (median)")
    ap.add_argument("--data", default=None, help="image folder (default: BUS-BRA beside the repository)")
    ap.add_argument("--n-images", type=int, default=256)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return []
    info = machine_info()
    print(f"CPU: {info['cpu']}; native bf16: {cpu_has_bf16()}; torch {torch.__version__}; {args.threads} threads; "
          f"{args.processes} process(es) per model, {args.rounds} rounds × {args.steps} steps per dtype", flush=True)
    goals = {"demo": None, "busbra-cpu": 1.2, "vit-s": 1.8, "vit-b": 1.8}  # issue 35's
    rows, raw = [], {}
    for name in args.models:
        raw[name] = run_processes(name, args)
        rows.append(summary(name, raw[name]))
    print(table(rows, goals), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "args": vars(args), "summary": rows, "runs": raw},
                                              indent=1))
    return rows


if __name__ == "__main__":
    main()
