"""Peak memory of the usual route (the whole score matrix, then its statistics) against the streaming kernel
`token_score_stats` at Gemma-2-2B shape, each in a fresh subprocess (CPU: peak resident set size above the
baseline, Linux VmHWM after resetting it; GPU: torch.cuda.max_memory_allocated above the baseline)."""

from __future__ import annotations

import bench_kernel
import harness

NAME = "memory"
ORDER = 2
# Features in the comparison; with full_width the streaming route also runs at all 16,384 features (once).
PLANS = {
    ("cpu", False): {"features": 1024, "full_width": True},
    ("cpu", True): {"features": 256, "full_width": False},
    ("cuda", False): {"features": 8192, "full_width": True},
    ("cuda", True): {"features": 2048, "full_width": False},
}


def worker_memory(spec: dict) -> dict:
    """One route in this fresh process: its peak memory and timing."""
    import numpy as np
    import torch

    from weightscope.compute.streaming import auto_chunk_size
    from weightscope.compute.token_scores import token_score_stats

    device, d, V, n = spec["device"], spec["d_model"], spec["d_vocab"], spec["n_features"]
    M = torch.from_numpy(np.fromfile(spec["m_path"], dtype=np.float32).reshape(d, V)).to(device)
    D = harness.randn((n, d), seed=2, device=device)
    top_k = bench_kernel.TOP_K
    if spec["route"] == "naive":
        fn = lambda: bench_kernel.naive_token_stats(D, M)  # noqa: E731
    else:
        fn = lambda: token_score_stats(D, M, k=top_k, progress=False, fused=True)  # noqa: E731
        for rows in (1, 3):  # compile the fused reduction (one row: its own specialisation) beforehand
            token_score_stats(D[:rows], M, k=top_k, progress=False, fused=True)
    chunk = auto_chunk_size(V, torch.float32, torch.device(device)) if spec["route"] == "streaming" else None
    with harness.PeakMemory(device) as peak:
        timing = harness.time_runs(fn, repeats=spec["repeats"], device=device, warmup=int(device == "cuda"))
    return {**peak.result, "time": timing, "chunk_size": chunk}


WORKERS = {"memory": worker_memory}


def run(ctx: harness.Context) -> dict:
    import sys

    import torch

    module = sys.modules[__name__]
    n, full_width = ctx.options.get("memory_features") or ctx.plan["features"], ctx.plan["full_width"]
    harness.log(f"memory: usual route vs streaming at gemma-2-2b shape, {n} features (subprocesses)")
    shape = bench_kernel.SHAPES["gemma-2-2b"]
    d, V, full = shape["d_model"], shape["d_vocab"], shape["n_features"]
    m_path = ctx.tmp / "M.f32"
    harness.randn((d, V), seed=1, device="cpu", scale=d**-0.5).numpy().tofile(m_path)
    repeats = max(1, ctx.repeats // 2)
    runs = {}
    for route in ("naive", "streaming"):
        spec = {"device": ctx.device, "d_model": d, "d_vocab": V, "n_features": n, "m_path": str(m_path),
                "route": route, "repeats": repeats}
        runs[route] = harness.run_worker(module, "memory", spec)
    if full_width:  # the usual route would need ~84 GB here: only the streaming kernel runs at full width
        spec = {**spec, "route": "streaming", "n_features": full, "repeats": 1}
        runs["streaming_full_width"] = harness.run_worker(module, "memory", spec)
    m_path.unlink()
    key = harness.peak_key(ctx.device)
    naive, stream = runs["naive"][key], runs["streaming"][key]
    # The usual route's peak grows with the number of features (it holds [n, d_vocab] score matrices); the
    # streaming kernel's grows only up to one chunk (features scored at once, capped by a memory budget).
    chunk = runs["streaming"]["chunk_size"]
    naive_full = naive * full / n
    stream_full = stream * min(full, chunk) / min(n, chunk)
    result = {
        **ctx.meta, "benchmark": "memory", "shape": "gemma-2-2b", "d_model": d, "d_vocab": V, "n_features": n,
        "n_features_model": full, "measure": key, "scores_bytes": 4 * n * V,
        "naive_route": runs["naive"], "streaming": runs["streaming"],
        "streaming_full_width": runs.get("streaming_full_width"),
        "ratio_peak_naive_over_streaming": naive / max(stream, 1),
        "ratio_time_naive_over_streaming": (runs["naive"]["time"]["median_s"]
                                            / runs["streaming"]["time"]["median_s"]),
        "extrapolated_full_width": {
            "n_features": full, "naive_peak_bytes": naive_full, "streaming_peak_bytes": stream_full,
            "streaming_chunk_size": chunk,
            "ratio_peak_naive_over_streaming": naive_full / max(stream_full, 1),
            "note": "not measured: the usual route's peak scaled linearly from the measured subset to all "
                    "features; the streaming peak scaled linearly to one chunk (streaming_chunk_size "
                    "features, set by the kernel's memory budget on this machine) and constant beyond",
        },
        "torch_dtype": str(torch.float32),
    }
    harness.log(f"  peak ratio naive / streaming = {result['ratio_peak_naive_over_streaming']:.2f}")
    return result


def table(r: dict, report: dict) -> str:
    x = r["extrapolated_full_width"]
    lines = ["| gemma-2-2b shape | features | peak (usual route) | peak (streaming) | ratio | time ratio |",
             "|---|---|---|---|---|---|",
             f"| measured | {r['n_features']:,} | {harness.gb(r['naive_route'][r['measure']])} | "
             f"{harness.gb(r['streaming'][r['measure']])} | {r['ratio_peak_naive_over_streaming']:.1f} | "
             f"{r['ratio_time_naive_over_streaming']:.2f} |",
             f"| extrapolated | {x['n_features']:,} | {harness.gb(x['naive_peak_bytes'])} | "
             f"{harness.gb(x['streaming_peak_bytes'])} | {x['ratio_peak_naive_over_streaming']:.0f} | |"]
    full = r.get("streaming_full_width")
    if full:
        lines.append(f"| measured, streaming only | {x['n_features']:,} | "
                     f"| {harness.gb(full[r['measure']])} | | {full['time']['median_s']:.1f} s (streaming) |")
    return "\n".join(lines) + "\n"
