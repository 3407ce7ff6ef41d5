"""Dense spatio-temporal attention (STT) against AnimateDiff's 1D temporal attention (JSON).

    python benchmarks/attention.py [--sizes 16x16,32x32] [--frames 16] [--channels 320]
                                   [--heads 8] [--radii 0,1,2,4,full] [--reps 3]

One motion-module self-attention layer at SD 1.5's widths (``320`` channels, 8 heads at the
top level), input ``(H*W, F, C)`` tokens for one clip. For every latent size and radius:
forward+backward time (median of ``--reps`` after a warm-up) and peak memory, next to the stock
diffusers processor (``temporal``). Each case runs in a fresh process so peak figures do not
mix: on CUDA the peak of ``torch.cuda.max_memory_allocated``; on CPU the growth of the process's
peak resident set over the inputs already allocated (``ru_maxrss``; coarser, same process
layout for every case). ``keys_per_query`` is what the radius asks for (``(2r+1)^2 F``, clipped
to the map); the halo tiling computes ``(T+2r)^2 F`` scores per query.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time


def _case(
    size: tuple[int, int],
    frames: int,
    channels: int,
    heads: int,
    radius,
    reps: int,
    device: str,
    tile: int | None,
) -> dict:
    import torch
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from mvcustom.models.attention import SpatioTemporalAttnProcessor

    torch.manual_seed(0)
    H, W = size
    attn = Attention(channels, heads=heads, dim_head=channels // heads).to(device)
    x = torch.randn(H * W, frames, channels, device=device, requires_grad=True)
    if radius == "temporal":
        attn.set_processor(AttnProcessor2_0())
        kwargs = {}
    else:
        attn.set_processor(SpatioTemporalAttnProcessor())
        kwargs = {"spatial_shape": (H, W), "radius": -1 if radius == "full" else int(radius), "tile": tile}

    def step() -> None:
        out = attn(x, **kwargs)
        out.square().mean().backward()
        x.grad = None
        attn.zero_grad(set_to_none=True)

    # peak baseline: weights and inputs allocated, nothing run yet
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up (kernels, allocator)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    if device == "cuda":
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss, 0) / 1024
    r = None if radius in ("temporal", "full") else int(radius)
    side = (lambda n: min(2 * r + 1, n)) if r is not None else (lambda n: n if radius == "full" else 1)
    return {
        "latent_hw": [H, W],
        "frames": frames,
        "radius": radius,
        "keys_per_query": side(H) * side(W) * frames,
        "fwd_bwd_ms": round(1000 * statistics.median(times), 2),
        "peak_mib": round(peak_mib, 1),
    }


def _run(args: tuple) -> dict:
    return _case(*args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="16x16,32x32", help="latent sizes HxW, comma-separated")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--channels", type=int, default=320)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--radii", default="0,1,2,4,full")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tile", type=int, default=None, help="STT query tile (default 2r+1)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    a = p.parse_args()
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sizes = [tuple(int(v) for v in s.split("x")) for s in a.sizes.split(",")]
    radii = ["temporal", *a.radii.split(",")]
    ctx = mp.get_context("spawn")
    results = []
    for size in sizes:
        for radius in radii:
            with ctx.Pool(1) as pool:  # a fresh process per case: clean peak-memory figures
                res = pool.apply(
                    _run, ((size, a.frames, a.channels, a.heads, radius, a.reps, device, a.tile),)
                )
            results.append(res)
            print(json.dumps(res), file=sys.stderr, flush=True)
    summary = {}
    for size in sizes:
        rows = [r for r in results if tuple(r["latent_hw"]) == size]
        base = next(r for r in rows if r["radius"] == "temporal")
        summary["x".join(map(str, size))] = {
            str(r["radius"]): {
                "time_vs_temporal": round(r["fwd_bwd_ms"] / max(base["fwd_bwd_ms"], 1e-9), 2),
                "peak_mib": r["peak_mib"],
            }
            for r in rows
        }
    print(
        json.dumps(
            {
                "benchmark": "stt_attention",
                "device": device,
                "torch_threads": torch.get_num_threads(),
                "channels": a.channels,
                "heads": a.heads,
                "cases": results,
                "summary": summary,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
