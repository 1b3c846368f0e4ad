#!/usr/bin/env python
"""weightscope benchmarks: the chapters' streaming kernels and the streaming loader, side by side with the
plain operations they replace, in one run on one device.

    .venv/bin/python bench/run.py [--quick] [--device cpu|cuda]      (or: make bench)

1. `kernel`:    chapter 1's `token_score_stats(D, M)`, eager and fused (torch.compile), against the bare
                product `D @ M` of the same shape (and against the usual route: the full product, then
                statistics and top-k), at the demo, GPT-2-small and Gemma-2-2B shapes; on CPU a subset of
                the features.
2. `memory`:    peak memory of the usual route against the streaming kernel at Gemma-2-2B shape, each in a
                fresh subprocess (CPU: peak resident set size above the baseline, Linux VmHWM after
                resetting it; GPU: torch.cuda.max_memory_allocated above the baseline).
   `chapter1`:  the whole chapter-1 kernel work of an SAE suite in bf16 (per layer, both sides, 16,384
                features at Gemma-2-2B shape; on a GPU all 26 layers, on CPU a small subset) against the
                same products alone.
3. `attention`: chapter 2's `head_reads` against its three fused products D @ W_Q, D @ W_K, D @ W_V (and a
                direct route through W_O per head), at Gemma-2-2B's attention shape and chapter 2's call size
                (16,384 features and 4,096 null rows; on CPU with --quick, fewer).
4. `loading`:   `checkpoints.load_weights(..., mlp=False)` against `AutoModelForCausalLM.from_pretrained` on
                a random bf16 checkpoint of Gemma-2-2B width and reduced depth (--depth), each load in a
                fresh subprocess. Skipped with --quick.

Timings are medians over --repeats runs after one warm-up (time.perf_counter; torch.cuda.synchronize on
GPU). Ratios matter more than absolute numbers on a shared machine: every comparison is measured in the
same run. Results go to bench/results/<device>-<date>[-quick].json (written atomically);
`bench/run.py --table FILE` prints a results file as markdown tables.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"

# Token-lens shapes: d_model, d_vocab, and the SAE width (features) the book uses at that model.
SHAPES = {
    "demo": {"d_model": 64, "d_vocab": 512, "n_features": 512},
    "gpt2-small": {"d_model": 768, "d_vocab": 50257, "n_features": 24576},
    "gemma-2-2b": {"d_model": 2304, "d_vocab": 256000, "n_features": 16384},
}
# Gemma-2-2B attention: 8 query heads of 256, 4 key/value heads; its 16k-wide SAEs. Chapter 2 reads the
# features and 4,096 null rows in one call per layer: 20,480 rows.
GEMMA_ATTENTION = {"d_model": 2304, "n_heads": 8, "n_kv_heads": 4, "d_head": 256, "n_features": 16384,
                   "n_null": 4096}
GEMMA_2B = {  # Gemma2Config of google/gemma-2-2b (num_hidden_layers is 26 there; --depth here)
    "vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216, "num_attention_heads": 8,
    "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 4096,
    "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "tie_word_embeddings": True,
}
# Features scored per shape (None: all), features in the memory comparison, in the attention benchmark.
PLANS = {
    ("cpu", False): {"subset": {"demo": None, "gpt2-small": 512, "gemma-2-2b": 64}, "memory": 1024,
                     "memory_full_width": True, "attention": None, "repeats": 5,
                     "chapter1": {"layers": 2, "features": 32}},
    ("cpu", True): {"subset": {"demo": None, "gpt2-small": 128, "gemma-2-2b": 16}, "memory": 256,
                    "memory_full_width": False, "attention": 1024, "repeats": 3,
                    "chapter1": {"layers": 1, "features": 8}},
    ("cuda", False): {"subset": {"demo": None, "gpt2-small": None, "gemma-2-2b": None}, "memory": 8192,
                      "memory_full_width": True, "attention": None, "repeats": 5,
                      "chapter1": {"layers": 26, "features": None}},
    ("cuda", True): {"subset": {"demo": None, "gpt2-small": 4096, "gemma-2-2b": 2048}, "memory": 2048,
                     "memory_full_width": False, "attention": None, "repeats": 3,
                     "chapter1": {"layers": 4, "features": None}},
}
TOP_K = 10


# ----------------------------------------------------------------------------------------------------------
# Measurement helpers
# ----------------------------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def time_runs(fn, *, repeats: int, device: str, warmup: int = 1) -> dict:
    """Seconds per call: median, min and every sample of `repeats` timed calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return {"median_s": statistics.median(samples), "min_s": min(samples), "samples_s": samples,
            "repeats": repeats, "warmup": warmup}


def time_interleaved(fns: dict, *, repeats: int, device: str, warmup: int = 1) -> dict[str, dict]:
    """`time_runs` for several routes measured round-robin (the order rotating every round), so that drifts
    in the load of a shared machine hit every route alike; one result dict per route."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            samples[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(xs), "min_s": min(xs), "samples_s": xs, "repeats": repeats,
                   "warmup": warmup, "interleaved_with": [n for n in names if n != name]}
            for name, xs in samples.items()}


def _proc_status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"{key}:\s+(\d+)", text).group(1)) * 1024 for key in ("VmRSS", "VmHWM")}


class PeakMemory:
    """Peak memory of a block above its start: host RSS (Linux VmHWM, reset via clear_refs), and CUDA."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.cuda0 = torch.cuda.memory_allocated()
        self.rss0 = _proc_status()["VmRSS"]
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.method = "VmHWM after clear_refs"
        except OSError:
            self.method = "ru_maxrss (peak over the process's life)"
        return self

    def __exit__(self, *exc):
        import resource

        import torch

        status = _proc_status()
        if self.method.startswith("VmHWM"):
            peak = status["VmHWM"]
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        text = Path("/proc/self/status").read_text()
        kinds = {key: int(re.search(rf"{key}:\s+(\d+)", text).group(1)) * 1024 for key in ("RssAnon", "RssFile")}
        self.result = {"rss_before_bytes": self.rss0, "rss_peak_bytes": peak,
                       "rss_peak_delta_bytes": peak - self.rss0, "rss_method": self.method,
                       "rss_anon_end_bytes": kinds["RssAnon"], "rss_file_end_bytes": kinds["RssFile"]}
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.result.update(cuda_before_bytes=self.cuda0, cuda_peak_bytes=torch.cuda.max_memory_allocated(),
                               cuda_peak_delta_bytes=torch.cuda.max_memory_allocated() - self.cuda0)
        return False


def environment(device: str) -> dict:
    import safetensors
    import torch
    import transformers

    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), platform.processor() or "unknown CPU")
    return {
        "device": device,
        "device_name": name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_total_bytes": _total_memory(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "cuda": torch.version.cuda if device == "cuda" else None,
    }


def _total_memory() -> int | None:
    try:
        import psutil

        return psutil.virtual_memory().total
    except ImportError:
        return None


def _gen(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


def _randn(shape, *, seed: int, device: str, scale: float = 1.0, dtype=None):
    """Gaussian tensor generated on CPU in row blocks (no transient copy), then moved to the device."""
    import torch

    dtype = dtype or torch.float32
    out = torch.empty(shape, dtype=dtype)
    g = _gen(seed)
    rows = max(1, (64 << 20) // (4 * max(1, math.prod(shape[1:]))))
    for start in range(0, shape[0], rows):
        block = out[start : start + rows]
        block.copy_(torch.randn(block.shape, generator=g).mul_(scale))
    return out.to(device)


# ----------------------------------------------------------------------------------------------------------
# 1. token_score_stats vs D @ M (and the usual route)
# ----------------------------------------------------------------------------------------------------------


def naive_token_stats(D, M, k: int = TOP_K) -> dict:
    """The usual route: the full score matrix, then the statistics and top-k with whole-matrix torch ops."""
    import torch

    S = D @ M
    top_scores, top_ids = S.topk(k, dim=1)
    bottom_scores, bottom_ids = S.topk(k, dim=1, largest=False)
    std, mean = torch.std_mean(S, dim=1, correction=0)
    C = S - mean[:, None]
    m2, m3, m4 = C.pow(2).mean(1), C.pow(3).mean(1), C.pow(4).mean(1)
    logp = torch.log_softmax(S, dim=1)
    entropy = -(logp.exp() * logp).sum(1)
    smax = top_scores[:, 0]
    out = {"top_ids": top_ids, "top_scores": top_scores, "bottom_ids": bottom_ids, "bottom_scores": bottom_scores,
           "max": smax, "min": bottom_scores[:, 0], "mean": mean, "std": std, "top_z": (smax - mean) / std,
           "skew": m3 / m2.pow(1.5), "kurtosis": m4 / m2.square() - 3.0, "entropy": entropy}
    return {name: value.cpu() for name, value in out.items()}


def bench_kernel(name: str, subset: int | None, device: str, repeats: int, meta: dict) -> dict:
    import torch

    from weightscope.compute.token_scores import token_score_stats

    shape = SHAPES[name]
    d, V = shape["d_model"], shape["d_vocab"]
    n = shape["n_features"] if subset is None else min(subset, shape["n_features"])
    M = _randn((d, V), seed=1, device=device, scale=d**-0.5)
    D = _randn((n, d), seed=2, device=device)
    flops = 2.0 * n * d * V
    small = flops < 1e9  # the demo shape: many repeats for stable medians
    reps = repeats * 20 if small else repeats
    routes = {
        "matmul": lambda: D @ M,
        "token_score_stats": lambda: token_score_stats(D, M, k=TOP_K, progress=False, fused=False),
        "token_score_stats_fused": lambda: token_score_stats(D, M, k=TOP_K, progress=False, fused=True),
        "naive_route": lambda: naive_token_stats(D, M),
    }
    naive_error = None
    try:  # the usual route holds several [n, d_vocab] matrices: at full width it may not fit (e.g. on a GPU)
        routes["naive_route"]()
    except (RuntimeError, MemoryError) as err:
        if "out of memory" not in str(err).lower() and not isinstance(err, MemoryError):
            raise
        naive_error = f"out of memory: {str(err).splitlines()[0][:200]}"
        del routes["naive_route"]
        _release(device)
    timed = time_interleaved(routes, repeats=reps, device=device)  # the warm-up call compiles the fused route
    matmul, kernel, naive = timed["matmul"], timed["token_score_stats"], timed.get("naive_route")
    fused = timed["token_score_stats_fused"]
    # agreement with the usual route on (up to) 256 features: scores and statistics (ids may differ on ties)
    m = min(n, 256)
    b = naive_token_stats(D[:m], M)
    agree = {}
    for label, flag in (("eager", False), ("fused", True)):
        a = token_score_stats(D[:m], M, k=TOP_K, progress=False, fused=flag)
        agree[label] = {stat: float((getattr(a, stat) - b[stat].float()).abs().max()
                                    / (b[stat].float().abs().max() + 1e-30))
                        for stat in ("top_scores", "bottom_scores", "mean", "std", "kurtosis", "entropy")}
    del D, M
    _release(device)
    return {
        **meta, "benchmark": "kernel", "shape": name, "d_model": d, "d_vocab": V,
        "n_features_model": shape["n_features"], "n_features": n, "k": TOP_K, "flop": flops,
        "matmul": {**matmul, "flop_per_s": flops / matmul["median_s"]},
        "token_score_stats": {**kernel, "flop_per_s": flops / kernel["median_s"], "fused": False},
        "token_score_stats_fused": {**fused, "flop_per_s": flops / fused["median_s"], "fused": True},
        "naive_route": {**naive, "flop_per_s": flops / naive["median_s"]} if naive else {"error": naive_error},
        "ratio_kernel_over_matmul": kernel["median_s"] / matmul["median_s"],
        "ratio_fused_over_matmul": fused["median_s"] / matmul["median_s"],
        "ratio_naive_over_kernel": naive["median_s"] / kernel["median_s"] if naive else None,
        "ratio_naive_over_fused": naive["median_s"] / fused["median_s"] if naive else None,
        "max_rel_diff_kernel_vs_naive": agree, "agreement_features": m,
    }


def _release(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------
# 2. peak memory: usual route vs streaming (one subprocess per measurement)
# ----------------------------------------------------------------------------------------------------------


def worker_memory(spec: dict) -> dict:
    import numpy as np
    import torch

    from weightscope.compute.token_scores import token_score_stats

    device, d, V, n = spec["device"], spec["d_model"], spec["d_vocab"], spec["n_features"]
    M = torch.from_numpy(np.fromfile(spec["m_path"], dtype=np.float32).reshape(d, V)).to(device)
    D = _randn((n, d), seed=2, device=device)
    if spec["route"] == "naive":
        fn = lambda: naive_token_stats(D, M)  # noqa: E731
    else:
        fn = lambda: token_score_stats(D, M, k=TOP_K, progress=False, fused=True)  # noqa: E731
        for rows in (1, 3):  # compile the fused reduction (one row is its own specialisation) before measuring
            token_score_stats(D[:rows], M, k=TOP_K, progress=False, fused=True)
    from weightscope.compute.streaming import auto_chunk_size

    chunk = auto_chunk_size(V, torch.float32, torch.device(device)) if spec["route"] == "streaming" else None
    with PeakMemory(device) as peak:
        timing = time_runs(fn, repeats=spec["repeats"], device=device, warmup=1 if device == "cuda" else 0)
    return {**peak.result, "time": timing, "chunk_size": chunk}


def bench_memory(n: int, device: str, repeats: int, meta: dict, tmp: Path, *, full_width: bool = False) -> dict:
    """Both routes at n features; with full_width, the streaming route also at all 16,384 features (once)."""
    import torch

    shape = SHAPES["gemma-2-2b"]
    d, V = shape["d_model"], shape["d_vocab"]
    m_path = tmp / "M.f32"
    M = _randn((d, V), seed=1, device="cpu", scale=d**-0.5)
    M.numpy().tofile(m_path)
    del M
    runs = {}
    for route in ("naive", "streaming"):
        spec = {"device": device, "d_model": d, "d_vocab": V, "n_features": n, "m_path": str(m_path),
                "route": route, "repeats": repeats}
        runs[route] = run_worker("memory", spec)
    if full_width:  # the usual route would need ~84 GB here: only the streaming kernel runs at full width
        spec = {**spec, "route": "streaming", "n_features": SHAPES["gemma-2-2b"]["n_features"], "repeats": 1}
        runs["streaming_full_width"] = run_worker("memory", spec)
    m_path.unlink()
    key = "cuda_peak_delta_bytes" if device == "cuda" else "rss_peak_delta_bytes"
    naive, stream = runs["naive"][key], runs["streaming"][key]
    full = shape["n_features"]
    # The usual route's peak grows with the number of features (it holds [n, d_vocab] score matrices); the
    # streaming kernel's grows only up to one chunk (features scored at once, capped by a memory budget).
    chunk = runs["streaming"]["chunk_size"]
    naive_full = naive * full / n
    stream_full = stream * min(full, chunk) / min(n, chunk)
    return {
        **meta, "benchmark": "memory", "shape": "gemma-2-2b", "d_model": d, "d_vocab": V, "n_features": n,
        "n_features_model": full, "measure": key, "scores_bytes": 4 * n * V,
        "naive_route": runs["naive"], "streaming": runs["streaming"],
        "streaming_full_width": runs.get("streaming_full_width"),
        "ratio_peak_naive_over_streaming": naive / max(stream, 1),
        "ratio_time_naive_over_streaming": runs["naive"]["time"]["median_s"] / runs["streaming"]["time"]["median_s"],
        "extrapolated_full_width": {
            "n_features": full, "naive_peak_bytes": naive_full, "streaming_peak_bytes": stream_full,
            "streaming_chunk_size": chunk,
            "ratio_peak_naive_over_streaming": naive_full / max(stream_full, 1),
            "note": "not measured: the usual route's peak scaled linearly from the measured subset to all "
                    "features; the streaming peak scaled linearly to one chunk (streaming_chunk_size features, "
                    "set by the kernel's memory budget on this machine) and constant beyond",
        },
        "torch_dtype": str(torch.float32),
    }


# ----------------------------------------------------------------------------------------------------------
# 3. head_reads vs its bare products
# ----------------------------------------------------------------------------------------------------------


def bench_attention(n: int | None, device: str, repeats: int, meta: dict) -> dict:
    import torch

    from weightscope.compute.attention import _fused_weights, _reads_chunk, head_reads, kv_head_index

    a = GEMMA_ATTENTION
    d, nh, nkv, dh = a["d_model"], a["n_heads"], a["n_kv_heads"], a["d_head"]
    rows = a["n_features"] + a["n_null"]  # one chapter-2 call: every feature and the null rows
    n = rows if n is None else min(n, rows)
    W_Q = _randn((nh, d, dh), seed=3, device=device, scale=d**-0.5)
    W_K = _randn((nkv, d, dh), seed=4, device=device, scale=d**-0.5)
    W_V = _randn((nkv, d, dh), seed=5, device=device, scale=d**-0.5)
    W_O = _randn((nh, dh, d), seed=6, device=device, scale=dh**-0.5)
    D = _randn((n, d), seed=7, device=device)
    flat = {name: W.permute(1, 0, 2).reshape(d, -1).contiguous() for name, W in (("Q", W_Q), ("K", W_K), ("V", W_V))}
    kv = kv_head_index(nh, nkv).tolist()

    def bare():
        return D @ flat["Q"], D @ flat["K"], D @ flat["V"]

    def direct():  # norms of D W_Q[h], D W_K[kv], and of the OV output D W_V[kv(h)] W_O[h] through W_O itself
        q = (D @ flat["Q"]).view(n, nh, dh).norm(dim=2)
        k = (D @ flat["K"]).view(n, nkv, dh).norm(dim=2)
        z = (D @ flat["V"]).view(n, nkv, dh)
        v = torch.stack([(z[:, kv[h]] @ W_O[h]).norm(dim=1) for h in range(nh)], dim=1)
        return q, k, v

    flops = 2.0 * n * d * (nh + 2 * nkv) * dh
    fused = _fused_weights(W_Q, W_K, W_V, W_O, torch.device(device), torch.float32)
    timed = time_interleaved({
        "bare": bare,
        "head_reads": lambda: head_reads(D, W_Q, W_K, W_V, W_O, progress=False),
        # the per-feature part alone: head_reads' per-call set-up (flattened weights, QR of each W_O[h]) done once
        "reads_only": lambda: _reads_chunk(D, **fused),
        "direct": direct,
    }, repeats=repeats, device=device)
    t_bare, t_kernel, t_direct = timed["bare"], timed["head_reads"], timed["direct"]
    t_reads = timed["reads_only"]
    setup = time_runs(lambda: _fused_weights(W_Q, W_K, W_V, W_O, torch.device(device), torch.float32),
                      repeats=repeats, device=device)
    reads = head_reads(D, W_Q, W_K, W_V, W_O, progress=False)
    q, _, v = (x.cpu() for x in direct())
    agree = {"q": float(((reads["q"] - q).abs() / q.abs()).max()), "v": float(((reads["v"] - v).abs() / v.abs()).max())}
    return {
        **meta, "benchmark": "attention", "shape": "gemma-2-2b attention", **a, "n_features_model": rows,
        "n_features": n, "flop_bare": flops,
        "bare_products": {**t_bare, "flop_per_s": flops / t_bare["median_s"]},
        "head_reads": {**t_kernel, "flop_per_s": flops / t_kernel["median_s"]},
        "direct_through_W_O": t_direct,
        "head_reads_setup": setup, "head_reads_without_setup": {**t_reads, "flop_per_s": flops / t_reads["median_s"]},
        "setup_note": "head_reads' per-call set-up: flattening W_Q/W_K/W_V and the QR of every W_O[h] (which "
                      "replaces z @ W_O[h] by z @ R_h^T); head_reads_without_setup times the per-feature part alone",
        "ratio_kernel_over_bare": t_kernel["median_s"] / t_bare["median_s"],
        "ratio_kernel_without_setup_over_bare": t_reads["median_s"] / t_bare["median_s"],
        "ratio_direct_over_kernel": t_direct["median_s"] / t_kernel["median_s"],
        "max_rel_diff_kernel_vs_direct": agree,
    }


# ----------------------------------------------------------------------------------------------------------
# 5. the whole chapter-1 kernel work of an SAE suite, in bf16, against the bare products alone
# ----------------------------------------------------------------------------------------------------------


def bench_chapter1(layers: int, features: int | None, device: str, repeats: int, meta: dict) -> dict:
    """Per layer, both sides of chapter 1 (`token_score_stats` of W_dec against the folded unembedding and of
    W_enc.T against W_E.T) for `features` features (None: all 16,384) of random Gemma-2-2B-shaped weights
    (bf16 on a GPU, fp32 on a CPU), against the same products alone, in the chunks the kernel would use (the
    full score matrices would not fit)."""
    import torch

    from weightscope.compute.streaming import auto_chunk_size
    from weightscope.compute.token_scores import token_score_stats

    shape = SHAPES["gemma-2-2b"]
    d, V = shape["d_model"], shape["d_vocab"]
    n = shape["n_features"] if features is None else min(features, shape["n_features"])
    # bf16 as the book runs on a GPU; on a CPU the chapters compute in fp32 (`chapter.resolve_dtype`): without
    # AVX-512-BF16/AMX, torch's CPU bf16 product is emulated, ~35x slower than fp32 on this benchmark's CPU
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    M_out = _randn((d, V), seed=1, device=device, scale=d**-0.5, dtype=dtype)
    M_in = _randn((d, V), seed=8, device=device, scale=d**-0.5, dtype=dtype)
    suite = [(_randn((n, d), seed=100 + layer, device=device, dtype=dtype),  # W_dec of the layer's SAE
              _randn((n, d), seed=200 + layer, device=device, dtype=dtype))  # W_enc.T
             for layer in range(layers)]
    chunk = min(n, auto_chunk_size(V, dtype, torch.device(device)))
    buffer = torch.empty(chunk, V, dtype=dtype, device=device)

    def bare():
        for W_dec, W_enc_T in suite:
            for D, M in ((W_dec, M_out), (W_enc_T, M_in)):
                for start in range(0, n, chunk):
                    rows = min(chunk, n - start)
                    torch.mm(D[start : start + rows], M, out=buffer[:rows])

    def analysis(fused):
        def run():
            for W_dec, W_enc_T in suite:
                token_score_stats(W_dec, M_out, k=TOP_K, progress=False, fused=fused)
                token_score_stats(W_enc_T, M_in, k=TOP_K, progress=False, fused=fused)
        return run

    timed = time_interleaved({"bare_products": bare, "chapter1_fused": analysis(True),
                              "chapter1_eager": analysis(False)}, repeats=repeats, device=device)
    flops = 2.0 * 2 * layers * n * d * V
    del suite, M_out, M_in, buffer
    _release(device)
    t_bare = timed["bare_products"]["median_s"]
    return {
        **meta, "benchmark": "chapter1", "dtype": str(dtype).removeprefix("torch."), "shape": "gemma-2-2b",
        "d_model": d, "d_vocab": V,
        "layers": layers, "layers_model": 26, "n_features": n, "n_features_model": shape["n_features"],
        "sides": 2, "chunk_size": chunk, "flop": flops,
        **{name: {**t, "flop_per_s": flops / t["median_s"]} for name, t in timed.items()},
        "ratio_fused_over_bare": timed["chapter1_fused"]["median_s"] / t_bare,
        "ratio_eager_over_bare": timed["chapter1_eager"]["median_s"] / t_bare,
    }


# ----------------------------------------------------------------------------------------------------------
# 4. loading: load_weights vs transformers' from_pretrained (one subprocess per load)
# ----------------------------------------------------------------------------------------------------------


def worker_write_checkpoint(spec: dict) -> dict:
    """A random bf16 Gemma-2-2B-width checkpoint of `depth` blocks: shard 1 the embedding, shard 2 the rest."""
    import safetensors.torch
    import torch
    import transformers

    folder = Path(spec["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    cfg = transformers.Gemma2Config(**GEMMA_2B, num_hidden_layers=spec["depth"],
                                    architectures=["Gemma2ForCausalLM"])
    cfg.dtype = torch.bfloat16
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in transformers.Gemma2ForCausalLM(cfg).state_dict().items()}
    shapes.pop("lm_head.weight")  # tied: Gemma checkpoints store only the embedding
    embed = "model.embed_tokens.weight"
    shards = {"model-00001-of-00002.safetensors": [embed],
              "model-00002-of-00002.safetensors": [k for k in shapes if k != embed]}
    weight_map, total = {}, 0
    for i, (shard, names) in enumerate(shards.items()):
        tensors = {}
        for j, name in enumerate(names):
            scale = 0.1 if name.endswith("norm.weight") else 0.02
            tensors[name] = _randn(shapes[name], seed=1000 * i + j, device="cpu", scale=scale, dtype=torch.bfloat16)
            weight_map[name] = shard
            total += tensors[name].nbytes
        safetensors.torch.save_file(tensors, folder / shard, metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    cfg.save_pretrained(folder)
    return {"total_bytes": total, "files": sorted(p.name for p in folder.iterdir())}


def needed_bytes(config: dict, dtype_bytes: int, *, fold_embed_scale: bool = True) -> int:
    """Bytes of the tensors `load_weights(mlp=False)` returns for a Gemma-2 config, in a dtype of this size."""
    d, V, L = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]
    nh, nkv, dh = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    per_layer = d + d * dh * (2 * nh + 2 * nkv)
    embed = V * d * (2 if fold_embed_scale else 1)  # W_E scaled, W_U the raw embedding
    return dtype_bytes * (embed + d + L * per_layer)


def worker_load(spec: dict) -> dict:
    import safetensors  # noqa: F401  imported before the baseline, like torch
    import torch

    device, folder = spec["device"], spec["folder"]
    dtype = getattr(torch, spec["dtype"])
    if spec["loader"] == "load_weights":
        from weightscope.load.checkpoints import load_weights

        with PeakMemory(device) as peak:
            start = time.perf_counter()
            ws = load_weights(folder, dtype=dtype, device=device, mlp=False,
                              fold_embed_scale=spec.get("fold_embed_scale", True))
            _sync(device)
            seconds = time.perf_counter() - start
        held = ws.nbytes()
        info = {"n_tensors": len(ws.tensors()), "held_bytes": held}
    else:
        import transformers

        with PeakMemory(device) as peak:
            start = time.perf_counter()
            try:
                model, loading = transformers.AutoModelForCausalLM.from_pretrained(
                    folder, dtype=dtype, device_map=device if device == "cuda" else None, output_loading_info=True)
            except (ImportError, ValueError):  # device_map may need accelerate: load on CPU, then move
                model, loading = transformers.AutoModelForCausalLM.from_pretrained(
                    folder, dtype=dtype, output_loading_info=True)
                model.to(device)
            _sync(device)
            seconds_returned = time.perf_counter() - start
            # transformers may hand back tensors backed by the file's memory map, read only when first used:
            # read every parameter once (aminmax: one pass, no temporaries) so that the weights are in memory
            for param in model.parameters():
                torch.aminmax(param.detach())
            _sync(device)
            seconds = time.perf_counter() - start
        held = sum(p.numel() * p.element_size() for p in model.parameters())
        info = {"held_bytes": held, "seconds_returned": seconds_returned,
                "missing_keys": len(loading["missing_keys"]), "unexpected_keys": len(loading["unexpected_keys"])}
    return {**peak.result, "seconds": seconds, **info}


def bench_loading(depth: int, device: str, repeats: int, meta: dict, tmp: Path) -> dict:
    folder = tmp / f"gemma-2-2b-width-{depth}-layers"
    written = run_worker("write_checkpoint", {"folder": str(folder), "depth": depth})
    config = json.loads((folder / "config.json").read_text())
    key = "cuda_peak_delta_bytes" if device == "cuda" else "rss_peak_delta_bytes"
    # (loader, dtype, fold_embed_scale); the unfolded case keeps W_U a view of W_E (one embedding, not two)
    cases = [("load_weights", "bfloat16", True), ("load_weights", "bfloat16", False),
             ("load_weights", "float32", True), ("from_pretrained", "bfloat16", None),
             ("from_pretrained", "float32", None)]

    def label(loader, dtype, fold):
        return f"{loader}[{dtype}{', fold_embed_scale=False' if fold is False else ''}]"

    samples: dict[str, list] = {label(*case): [] for case in cases}
    for _ in range(repeats):  # interleaved, so that drifts in machine load hit every case alike
        for loader, dtype, fold in cases:
            spec = {"device": device, "folder": str(folder), "loader": loader, "dtype": dtype,
                    "fold_embed_scale": fold}
            samples[label(loader, dtype, fold)].append(run_worker("load", spec))
    shutil.rmtree(folder)
    out = {}
    for (loader, dtype, fold), (name, runs) in zip(cases, samples.items()):
        # the same tensors as each loader holds them: from_pretrained keeps the tied embedding once
        needed = needed_bytes(config, 2 if dtype == "bfloat16" else 4, fold_embed_scale=bool(fold))
        peaks = [r[key] for r in runs]
        out[name] = {
            "loader": loader, "dtype": dtype, "fold_embed_scale": fold, "repeats": len(runs),
            "median_s": statistics.median(r["seconds"] for r in runs), "samples_s": [r["seconds"] for r in runs],
            "median_s_returned": statistics.median(r.get("seconds_returned", r["seconds"]) for r in runs),
            "peak_delta_bytes_median": statistics.median(peaks), "peak_delta_bytes_max": max(peaks),
            "needed_bytes": needed, "held_bytes": runs[0]["held_bytes"],
            "ratio_peak_over_needed": statistics.median(peaks) / needed, "runs": runs,
        }
    lw, hf = out["load_weights[bfloat16]"], out["from_pretrained[bfloat16]"]
    lw32, hf32 = out["load_weights[float32]"], out["from_pretrained[float32]"]
    return {
        **meta, "benchmark": "loading", "shape": f"gemma-2-2b width, {depth} layers", "depth": depth,
        "checkpoint_bytes": written["total_bytes"], "checkpoint_files": written["files"], "measure": key,
        "needed_definition": "bytes, in the load dtype, of the tensors load_weights(mlp=False) returns: the "
                             "embedding (twice when fold_embed_scale: W_E scaled by sqrt(d_model) as TransformerLens "
                             "stores it, and W_U the raw embedding; once otherwise, and for from_pretrained, which "
                             "ties them), ln_final, and per layer ln1 and W_Q/W_K/W_V/W_O",
        "page_cache": "warm: the checkpoint was just written and read by every case",
        "cases": out,
        "ratio_time_from_pretrained_over_load_weights_bf16": hf["median_s"] / lw["median_s"],
        "ratio_peak_from_pretrained_over_load_weights_bf16": hf["peak_delta_bytes_median"] / lw["peak_delta_bytes_median"],
        "ratio_time_from_pretrained_over_load_weights_fp32": hf32["median_s"] / lw32["median_s"],
        "ratio_peak_from_pretrained_over_load_weights_fp32": hf32["peak_delta_bytes_median"] / lw32["peak_delta_bytes_median"],
        "from_pretrained_note": "from_pretrained loads the whole model (MLP included); its time and peak are taken "
                                "after reading every parameter once (transformers may return tensors backed by "
                                "the file's memory map, which count in RSS only once read); median_s_returned is "
                                "the time until from_pretrained returned",
    }


# ----------------------------------------------------------------------------------------------------------
# Subprocess plumbing, driver, tables
# ----------------------------------------------------------------------------------------------------------

WORKERS = {"memory": worker_memory, "write_checkpoint": worker_write_checkpoint, "load": worker_load}
_MARK = "BENCH-RESULT "


def run_worker(kind: str, spec: dict) -> dict:
    """Run WORKERS[kind](spec) in a fresh interpreter; its result comes back as one marked JSON line."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "lib"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", kind, json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    raise RuntimeError(f"bench worker {kind} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def write_atomically(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared and committed
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller subsets, fewer repeats, no loading step")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 5; 3 quick)")
    parser.add_argument("--depth", type=int, default=4, help="blocks in the Gemma-2-2B-width loading checkpoint")
    parser.add_argument("--load-repeats", type=int, default=3, help="fresh-process loads per loader")
    parser.add_argument("--memory-features", type=int, default=None, help="features in the memory comparison")
    parser.add_argument("--only", default="kernel,memory,chapter1,attention,loading",
                        help="comma-separated benchmarks")
    parser.add_argument("--kernel-threads", default=None,
                        help="comma-separated torch thread counts for the kernel benchmark (default: torch's "
                             "default, plus 1 on a multi-core CPU in a full run)")
    parser.add_argument("--tmpdir", default=None, help="where to write temporary matrices and the checkpoint")
    parser.add_argument("--out", default=None, help="results file (default bench/results/<device>-<date>[-quick].json)")
    parser.add_argument("--table", metavar="FILE", help="print a results file as markdown tables and exit")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        kind, spec = args.worker
        print(_MARK + json.dumps(WORKERS[kind](json.loads(spec))), flush=True)
        return 0
    if args.table:
        print(tables(json.loads(Path(args.table).read_text())))
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    plan = dict(PLANS[(args.device, args.quick)])
    repeats = args.repeats or plan["repeats"]
    only = set(args.only.split(","))
    if args.quick:
        only.discard("loading")
    started = dt.datetime.now(dt.timezone.utc)
    env = environment(args.device)
    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    meta = {"device": args.device, "device_name": env["device_name"], "dtype": "float32", "torch": env["torch"],
            "transformers": env["transformers"], "command": command}
    out_path = Path(args.out) if args.out else RESULTS_DIR / (
        f"{args.device}-{started.date().isoformat()}{'-quick' if args.quick else ''}.json")
    report = {"schema": 1, "command": command, "cwd": os.getcwd(), "mode": "quick" if args.quick else "full",
              "started_utc": started.isoformat(timespec="seconds"), "environment": env, "repeats": repeats,
              "plan": {**plan, "repeats": repeats, "memory": args.memory_features or plan["memory"],
                       "depth": args.depth if "loading" in only else None},
              "load_average_start": os.getloadavg(), "results": {}}
    _log(f"{env['device_name']} ({env['torch_threads']} torch threads), torch {env['torch']}; mode {report['mode']}")
    tmp = Path(tempfile.mkdtemp(prefix="weightscope-bench-", dir=args.tmpdir))
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            if "kernel" in only:
                default_threads = torch.get_num_threads()
                if args.kernel_threads:
                    threads = [int(t) for t in args.kernel_threads.split(",")]
                else:  # one thread too: on a shared CPU, many small parallel ops wait on descheduled threads
                    threads = [default_threads] + ([1] if args.device == "cpu" and default_threads > 1
                                                   and not args.quick else [])
                rows = []
                for count in threads:
                    torch.set_num_threads(count)
                    for name in SHAPES:
                        _log(f"kernel: {name} ({plan['subset'][name] or 'all'} features, {count} threads)")
                        rows.append({**bench_kernel(name, plan["subset"][name], args.device, repeats, meta),
                                     "torch_threads": count})
                        _log(f"  ratio kernel / D@M = {rows[-1]['ratio_kernel_over_matmul']:.2f}")
                torch.set_num_threads(default_threads)
                report["results"]["kernel"] = rows
            if "memory" in only:
                n = args.memory_features or plan["memory"]
                _log(f"memory: usual route vs streaming at gemma-2-2b shape, {n} features (subprocesses)")
                report["results"]["memory"] = bench_memory(n, args.device, max(1, repeats // 2), meta, tmp,
                                                           full_width=plan["memory_full_width"])
                _log(f"  peak ratio naive / streaming = {report['results']['memory']['ratio_peak_naive_over_streaming']:.2f}")
            if "chapter1" in only:
                spec = plan["chapter1"]
                _log(f"chapter1: {spec['layers']} layers x {spec['features'] or 'all'} features x 2 sides")
                report["results"]["chapter1"] = bench_chapter1(spec["layers"], spec["features"], args.device,
                                                               repeats, meta)
                _log(f"  ratio fused / bare = {report['results']['chapter1']['ratio_fused_over_bare']:.2f}")
            if "attention" in only:
                _log(f"attention: head_reads at gemma-2-2b shape ({plan['attention'] or 'all'} features)")
                report["results"]["attention"] = bench_attention(plan["attention"], args.device, repeats, meta)
                _log(f"  ratio head_reads / bare = {report['results']['attention']['ratio_kernel_over_bare']:.2f}")
        if "loading" in only:
            _log(f"loading: writing a {args.depth}-layer gemma-2-2b-width bf16 checkpoint under {tmp}")
            report["results"]["loading"] = bench_loading(args.depth, args.device, args.load_repeats, meta, tmp)
            for label, case in report["results"]["loading"]["cases"].items():
                _log(f"  {label}: {case['median_s']:.2f} s, peak/needed {case['ratio_peak_over_needed']:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["wall_s"] = time.perf_counter() - t0
    report["load_average_end"] = os.getloadavg()
    report["finished_utc"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    write_atomically(out_path, report)
    _log(f"wrote {out_path} ({report['wall_s']:.0f} s)")
    print(tables(report))
    return 0


def _ms(timing: dict) -> str:
    return f"{timing['median_s'] * 1e3:.1f} ms"


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB" if x >= 1e8 else f"{x / 1e6:.1f} MB"


def tables(report: dict) -> str:
    """Markdown tables of a results dict (as written by this script)."""
    env, res, lines = report["environment"], report["results"], []
    lines.append(f"Device: {env['device_name']} ({env['device']}, {env['torch_threads']} torch threads); "
                 f"torch {env['torch']}, transformers {env['transformers']}; {report['mode']} run, "
                 f"medians of {report['repeats']} runs; load average {report['load_average_start'][0]:.1f} at the "
                 f"start, {report['load_average_end'][0]:.1f} at the end; `{report['command']}`\n")
    if "kernel" in res:
        lines += ["| shape | features (of) | threads | D @ M | eager kernel | ratio | fused kernel | ratio "
                  "| usual route | GFLOP/s (D @ M / eager / fused) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["kernel"]:
            eager, fused = r["token_score_stats"], r.get("token_score_stats_fused")
            lines.append(
                f"| {r['shape']} ({r['d_model']} x {r['d_vocab']:,}) | {r['n_features']:,} ({r['n_features_model']:,}) "
                f"| {r.get('torch_threads', env['torch_threads'])} | {_ms(r['matmul'])} "
                f"| {_ms(eager)} | {r['ratio_kernel_over_matmul']:.2f} "
                + (f"| {_ms(fused)} | {r['ratio_fused_over_matmul']:.2f} " if fused else "| | ")
                + (f"| {_ms(r['naive_route'])} " if "median_s" in r["naive_route"] else "| out of memory ")
                + f"| {r['matmul']['flop_per_s'] / 1e9:.1f} / {eager['flop_per_s'] / 1e9:.1f}"
                + (f" / {fused['flop_per_s'] / 1e9:.1f} |" if fused else " |"))
        lines.append("")
    if "chapter1" in res:
        r = res["chapter1"]
        lines += [f"| chapter 1, gemma-2-2b shape, {r['dtype']} | layers x features x sides | chunk | bare products "
                  "| fused kernel | ratio | eager kernel | ratio | TFLOP/s (bare / fused) |",
                  "|---|---|---|---|---|---|---|---|---|",
                  f"| {'all layers' if r['layers'] == r['layers_model'] else 'a subset'} "
                  f"| {r['layers']} x {r['n_features']:,} x 2 | {r['chunk_size']:,} "
                  f"| {r['bare_products']['median_s']:.2f} s | {r['chapter1_fused']['median_s']:.2f} s "
                  f"| {r['ratio_fused_over_bare']:.2f} | {r['chapter1_eager']['median_s']:.2f} s "
                  f"| {r['ratio_eager_over_bare']:.2f} | {r['bare_products']['flop_per_s'] / 1e12:.2f} / "
                  f"{r['chapter1_fused']['flop_per_s'] / 1e12:.2f} |", ""]
    if "memory" in res:
        r = res["memory"]
        x = r["extrapolated_full_width"]
        lines += ["| gemma-2-2b shape | features | peak (usual route) | peak (streaming) | ratio | time ratio |",
                  "|---|---|---|---|---|---|",
                  f"| measured | {r['n_features']:,} | {_gb(r['naive_route'][r['measure']])} | "
                  f"{_gb(r['streaming'][r['measure']])} | {r['ratio_peak_naive_over_streaming']:.1f} | "
                  f"{r['ratio_time_naive_over_streaming']:.2f} |",
                  f"| extrapolated | {x['n_features']:,} | {_gb(x['naive_peak_bytes'])} | "
                  f"{_gb(x['streaming_peak_bytes'])} | {x['ratio_peak_naive_over_streaming']:.0f} | |"]
        full = r.get("streaming_full_width")
        if full:
            lines.append(f"| measured, streaming only | {x['n_features']:,} | | {_gb(full[r['measure']])} | | "
                         f"{full['time']['median_s']:.1f} s (streaming) |")
        lines.append("")
    if "attention" in res:
        r = res["attention"]
        lines += ["| gemma-2-2b attention | features | bare products | head_reads | ratio | set-up (QR) | "
                  "head_reads without set-up | ratio | through W_O | GFLOP/s (bare / kernel) |",
                  "|---|---|---|---|---|---|---|---|---|---|",
                  f"| 8 heads x 256, 4 kv heads | {r['n_features']:,} | {r['bare_products']['median_s'] * 1e3:.1f} ms "
                  f"| {r['head_reads']['median_s'] * 1e3:.1f} ms | {r['ratio_kernel_over_bare']:.2f} "
                  f"| {r['head_reads_setup']['median_s'] * 1e3:.1f} ms "
                  f"| {r['head_reads_without_setup']['median_s'] * 1e3:.1f} ms "
                  f"| {r['ratio_kernel_without_setup_over_bare']:.2f} "
                  f"| {r['direct_through_W_O']['median_s'] * 1e3:.1f} ms "
                  f"| {r['bare_products']['flop_per_s'] / 1e9:.1f} / {r['head_reads']['flop_per_s'] / 1e9:.1f} |", ""]
    if "loading" in res:
        r = res["loading"]
        lines += [f"Checkpoint: {r['shape']}, {_gb(r['checkpoint_bytes'])} of bf16 tensors.\n",
                  "| loader | dtype | time | peak RSS above baseline | tensors held | tensors needed | peak / needed |",
                  "|---|---|---|---|---|---|---|"]
        for case in r["cases"].values():
            loader = case["loader"] + (" (fold_embed_scale=False)" if case.get("fold_embed_scale") is False else "")
            lines.append(f"| {loader} | {case['dtype']} | {case['median_s']:.2f} s "
                         f"| {_gb(case['peak_delta_bytes_median'])} | {_gb(case['held_bytes'])} "
                         f"| {_gb(case['needed_bytes'])} | {case['ratio_peak_over_needed']:.2f} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
