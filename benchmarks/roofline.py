"""How close a pre-training step is to what this CPU's matrix multiplies can do at the step's own shapes.

One D²MAE pre-training step (the memory data path's crops of real images, the per-sample blur, forward, backward,
fused AdamW) is profiled once with ``torch.profiler`` (shapes recorded). Every matrix multiply (``aten::mm``,
``addmm``, ``bmm``) and attention call (``scaled_dot_product_attention`` kernels, forward and backward) of that step
is then timed in isolation at its own shapes and dtype, with the same threads; their sum is the step's **limit**:
the time the step would take if it did nothing but those products at the speed they reach alone. The step's measured
time (median of ``--steps``) over that limit is the fraction reported, with the rest broken down by the profile:
data (the crop), blur, the products inside the step, other kernels (elementwise, norms, softmax, copies), the
optimizer, and framework overhead (the step's wall time that no kernel accounts for). The products of the crops (two
per image) and of the blur (two batched matrix products per image, Eq. 1) are among the step's products; profiled
kernel times carry the profiler's own cost. The images are the first ``--n-images`` of BUS-BRA beside the repository
(or ``--data``), decoded once into the memory path's cache, so the crops resample windows of the sizes training
sees.

    python benchmarks/roofline.py                  # busbra-cpu's model: ViT-Tiny, 96 px, decoder 128 × 2, batch 64
    python benchmarks/roofline.py --threads 1 2        # one table per thread count
    python benchmarks/roofline.py --img-size 224 --decoder-embed-dim 512 --decoder-depth 8 --batch-size 16
    python benchmarks/roofline.py --allocator default  # glibc's own allocator rules (the command line keeps memory)

Prints a Markdown table per thread count (and ``--json`` writes them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BUSBRA = REPO.parent / "shared" / "data" / "bus-bra" / "images"
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from d2mae.data.cache import DecodedCache  # noqa: E402
from d2mae.data.phantom import generate_phantoms  # noqa: E402
from d2mae.data.sources import find_images  # noqa: E402
from d2mae.method.model_config import ModelConfig  # noqa: E402
from d2mae.method.models import DeblurMAE  # noqa: E402
from d2mae.method.presets import PRESETS  # noqa: E402
from d2mae.runtime.machine import machine_info  # noqa: E402
from d2mae.runtime.memory import keep_freed_memory  # noqa: E402
from d2mae.train.optim import adamw  # noqa: E402

PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm")
ATTENTION = ("aten::_scaled_dot_product_flash_attention_for_cpu",
             "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
             "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_flash_attention")


def images_for(args: argparse.Namespace, tmp: Path) -> list[str]:
    """The first ``--n-images`` of ``--data`` (BUS-BRA beside the repository by default); without it, phantoms at
    BUS-BRA's stored size for this model (about 3.3 × the model's side: the memory path keeps every crop at full
    resolution, :func:`d2mae.data.cache.stored_shape`)."""
    folder = Path(args.data) if args.data else BUSBRA
    if folder.is_dir():
        return find_images([folder])[:args.n_images]
    generate_phantoms(tmp, n=args.n_images, size=int(round(3.3 * args.img_size)), seed=0)
    return find_images([tmp / "images"])


def build(args: argparse.Namespace, refs: list[str]) -> tuple[DeblurMAE, torch.optim.Optimizer, DecodedCache]:
    cfg = ModelConfig(**PRESETS["d2mae"], arch=args.model, img_size=args.img_size,
                      decoder_embed_dim=args.decoder_embed_dim, decoder_depth=args.decoder_depth,
                      decoder_num_heads=args.decoder_num_heads, mean=[0.45], std=[0.25])
    torch.manual_seed(0)
    model = DeblurMAE(cfg).train()
    optimizer = adamw([{"params": list(model.parameters())}], lr=1e-4, betas=(0.9, 0.95))
    return model, optimizer, DecodedCache(refs, args.img_size)  # the memory data path's cache, as pretrain builds it


def one_step(model: DeblurMAE, optimizer: torch.optim.Optimizer, cache: DecodedCache, g: torch.Generator,
             batch: int) -> dict[str, float]:
    """One pre-training step, its parts timed with the wall clock (each part ends in a host value, so on the CPU
    the times are the parts' own)."""
    cfg = model.config
    t0 = time.perf_counter()
    x = cache.batch(torch.randint(0, len(cache), (batch,), generator=g), g)  # [B, 1, S, S]: crops + flips
    t1 = time.perf_counter()
    t = model.schedule.sample(batch, generator=g)
    noise = torch.rand(batch, cfg.num_patches, generator=g)
    loss, _, _ = model(x, t, noise=noise)
    t2 = time.perf_counter()
    loss.backward()
    t3 = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t4 = time.perf_counter()
    return {"data": t1 - t0, "forward": t2 - t1, "backward": t3 - t2, "optimizer": t4 - t3, "step": t4 - t0}


def time_isolated(fn: Any, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def product_call(name: str, shapes: list[list[int]], dtype: torch.dtype) -> Any:
    """A closure that runs ``name`` alone on random tensors of the recorded ``shapes``."""
    tensors = [torch.randn(*s, dtype=dtype) if s else None for s in shapes]
    if name == "aten::mm":
        a, b = tensors[:2]
        return lambda: torch.mm(a, b)
    if name == "aten::addmm":
        c, a, b = tensors[:3]
        return lambda: torch.addmm(c, a, b)
    if name == "aten::bmm":
        a, b = tensors[:2]
        return lambda: torch.bmm(a, b)
    return None


def attention_call(name: str, shapes: list[list[int]], dtype: torch.dtype) -> Any:
    q, k, v = (torch.randn(*s, dtype=dtype, requires_grad="backward" in name) for s in shapes[:3])
    if "backward" in name:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        grad = torch.randn_like(out)
        return lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
    return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)


DTYPES = {"float": torch.float32, "c10::BFloat16": torch.bfloat16, "c10::Half": torch.float16,
          "double": torch.float64}


def isolated_limit(prof: Any, repeats: int) -> dict[str, Any]:
    """The step's limit from its profile: every matrix product and attention call, timed alone at its recorded
    shapes and dtype (``limit_s``; per op in ``products_alone_s``); with the profiled self times of the products
    (``products_in_step_s``), of all kernels and of the optimizer's."""
    self_time: dict[str, float] = defaultdict(float)
    calls: dict[tuple[str, str, str], int] = defaultdict(int)
    for e in prof.events():
        self_time[e.name] += e.self_cpu_time_total / 1e6
        if e.name in PRODUCTS or e.name in ATTENTION:
            calls[(e.name, json.dumps(e.input_shapes), str(e.input_dtypes[0]))] += 1
    limit, products_alone, dtypes = 0.0, {}, defaultdict(int)
    for (name, shapes_text, dtype_name), count in calls.items():
        shapes, dtype = json.loads(shapes_text), DTYPES.get(dtype_name, torch.float32)
        fn = product_call(name, shapes, dtype) if name in PRODUCTS else attention_call(name, shapes, dtype)
        if fn is None:
            continue
        seconds = time_isolated(fn, repeats) * count
        products_alone[name] = products_alone.get(name, 0.0) + seconds
        dtypes[str(dtype).removeprefix("torch.")] += count
        limit += seconds
    in_step = sum(self_time[n] for n in PRODUCTS + ATTENTION)
    optimizer_kernels = sum(v for k, v in self_time.items() if "adam" in k.lower())
    return {"limit_s": limit, "products_alone_s": products_alone, "products_in_step_s": in_step,
            "kernels_s": sum(self_time.values()), "optimizer_kernels_s": optimizer_kernels,
            "product_calls": sum(calls.values()), "dtypes": dict(dtypes)}


def measure(args: argparse.Namespace, threads: int, refs: list[str]) -> dict[str, Any]:
    torch.set_num_threads(threads)
    model, optimizer, cache = build(args, refs)
    g = torch.Generator().manual_seed(1)
    for _ in range(args.warmup):
        one_step(model, optimizer, cache, g, args.batch_size)
    parts = [one_step(model, optimizer, cache, g, args.batch_size) for _ in range(args.steps)]
    median = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        one_step(model, optimizer, cache, g, args.batch_size)
    lim = isolated_limit(prof, args.repeats)
    return {
        "threads": threads, "step_s": median["step"], "limit_s": lim["limit_s"],
        "fraction": median["step"] / lim["limit_s"], "parts_s": median,
        "products_in_step_s": lim["products_in_step_s"], "products_alone_s": lim["products_alone_s"],
        "other_kernels_s": lim["kernels_s"] - lim["products_in_step_s"] - lim["optimizer_kernels_s"],
        "optimizer_kernels_s": lim["optimizer_kernels_s"], "overhead_s": max(0.0, median["step"] - lim["kernels_s"]),
        "product_calls": lim["product_calls"],
    }


def table(r: dict[str, Any], args: argparse.Namespace) -> str:
    p = r["parts_s"]
    ms = lambda s: f"{1000 * s:.1f}"  # noqa: E731
    rows = [
        ("**limit**: every matrix product and attention call of the step, each alone at its shapes",
         ms(r["limit_s"]), "100%"),
        ("**measured step** (median)", ms(r["step_s"]), f"{100 * r['fraction']:.0f}%"),
        ("— data: the batch's crops (memory path)", ms(p["data"]), f"{100 * p['data'] / r['limit_s']:.0f}%"),
        ("— forward (blur, encoder, decoder, loss)", ms(p["forward"]), f"{100 * p['forward'] / r['limit_s']:.0f}%"),
        ("— backward", ms(p["backward"]), f"{100 * p['backward'] / r['limit_s']:.0f}%"),
        ("— optimizer (fused AdamW)", ms(p["optimizer"]), f"{100 * p['optimizer'] / r['limit_s']:.0f}%"),
        ("products inside the step (profiled self time)", ms(r["products_in_step_s"]),
         f"{100 * r['products_in_step_s'] / r['limit_s']:.0f}%"),
        ("other kernels (elementwise, norms, softmax, copies, building the blur matrices)", ms(r["other_kernels_s"]),
         f"{100 * r['other_kernels_s'] / r['limit_s']:.0f}%"),
        ("framework overhead (measured step minus all profiled kernel time, at least 0)", ms(r["overhead_s"]),
         f"{100 * r['overhead_s'] / r['limit_s']:.0f}%"),
    ]
    head = (f"{args.model}, {args.img_size} px, decoder {args.decoder_embed_dim} × {args.decoder_depth}, batch "
            f"{args.batch_size}, fp32, {r['threads']} thread(s); {r['product_calls']} product/attention calls")
    lines = [f"### {head}", "", "| | ms | of the limit |", "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_tiny_patch16")
    ap.add_argument("--img-size", type=int, default=96)
    ap.add_argument("--decoder-embed-dim", type=int, default=128)
    ap.add_argument("--decoder-depth", type=int, default=2)
    ap.add_argument("--decoder-num-heads", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="timings of each isolated product (median)")
    ap.add_argument("--data", default=None, help="image folder (default: BUS-BRA beside the repository, else "
                    "phantoms at its stored size)")
    ap.add_argument("--n-images", type=int, default=256, help="images in the memory cache")
    ap.add_argument("--allocator", default="kept", choices=["kept", "default"],
                    help="kept: freed memory stays in the process, as the d2mae command line sets it "
                         "(d2mae.runtime.memory); default: glibc's own rules")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    kept = args.allocator == "kept" and keep_freed_memory()
    info = machine_info()
    print(f"CPU: {info['cpu']}; torch {torch.__version__}; freed memory {'kept' if kept else 'glibc default'}",
          flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        refs = images_for(args, Path(tmp))
        print(f"data: {len(refs)} images from {Path(refs[0]).parent}", flush=True)
        for threads in args.threads:
            r = measure(args, threads, refs)
            results.append(r)
            print(table(r, args) + "\n", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "args": vars(args), "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
