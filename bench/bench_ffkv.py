#!/usr/bin/env python
"""FF-KV benchmark: the book's kernels streaming over MLP neurons at Llama-3.1-8B's MLP shape.

    .venv/bin/python bench/bench_ffkv.py [--device cpu|cuda] [--repeats 3] [--neurons N]

Llama-3.1-8B has 14,336 neurons per block, d_model 4,096, a 128,256-token vocabulary, 32 query heads and 8
key/value heads of 128, and Llama Scope's 8x residual SAEs have 32,768 features. On random weights of those
shapes, each kernel chapter 6 calls on the neurons is timed against the bare matrix product it is built on:

1. `lens`:      `token_score_stats(V, W_U)` (top/bottom-k and distribution statistics of each value vector's
                scores over the vocabulary) against the product `V @ W_U` alone;
2. `reads`:     `head_reads(V, W_Q, W_K, W_V, W_O)` of one later layer against the products `V @ W_Q`,
                `V @ W_K`, `V @ W_V` alone; its per-call set-up (the QR of each head's W_O, independent of
                the rows) is also timed on one row and reported apart;
3. `alignment`: `ffkv.max_cosine(W_dec, V)` of SAE decoder rows against all 14,336 value vectors, against
                `W_dec @ V.T` alone;
4. `both_ways`: `ffkv.max_cosine_both(W_dec, V)` (chapter 6's real rows, both sides from one pass) against
                `max_cosine(W_dec, V)` and `max_cosine(V, W_dec)` (its two passes before): about 0.5 expected.

On a CPU a subset of the rows (--neurons, default 32, 256 and 128 for the three) goes through; on a GPU all of
them. Times are medians over --repeats runs after one warm-up; the ratio kernel / product is what carries over
between machines. Results go to bench/results/ffkv-<device>-<date>.json (written atomically).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))

from weightscope.compute import ffkv  # noqa: E402
from weightscope.compute.attention import head_reads  # noqa: E402
from weightscope.compute.token_scores import token_score_stats  # noqa: E402
from weightscope.io import atomic_write_json  # noqa: E402

LLAMA_8B = {"d_model": 4096, "d_mlp": 14336, "d_vocab": 128256, "n_heads": 32, "n_kv_heads": 8, "d_head": 128,
            "sae_features": 32768}
CPU_ROWS = {"lens": 32, "reads": 256, "alignment": 128}  # rows through each kernel on a CPU


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device: str, repeats: int) -> dict:
    """Median and all samples (seconds) of `repeats` runs of fn() after one warm-up."""
    fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return {"median_s": statistics.median(samples), "samples_s": samples}


def randn(*shape, device: str, seed: int, scale: float = 0.02) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device)


def pair(name: str, kernel, bare, device: str, repeats: int, **meta) -> dict:
    k, b = median_time(kernel, device, repeats), median_time(bare, device, repeats)
    print(f"{name:10s} kernel {k['median_s']:.3f} s, bare product {b['median_s']:.3f} s, "
          f"ratio {k['median_s'] / b['median_s']:.2f}", flush=True)
    return {"benchmark": name, **meta, "kernel": k, "bare_product": b, "ratio": k["median_s"] / b["median_s"]}


def environment(device: str) -> dict:
    """The machine a result was measured on (load average included: this CPU is shared)."""
    return {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None, "load_average": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--neurons", type=int, default=0, help="rows per kernel (0: the device's default)")
    args = parser.parse_args(argv)
    device, s = args.device, LLAMA_8B
    torch.set_grad_enabled(False)

    def rows(name: str, full: int) -> int:
        if args.neurons:
            return min(args.neurons, full)
        return full if device == "cuda" else CPU_ROWS[name]

    V_all = randn(s["d_mlp"], s["d_model"], device=device, seed=0)  # value vectors (rows of W_out)
    results = []
    n = rows("lens", s["d_mlp"])
    W_U = randn(s["d_model"], s["d_vocab"], device=device, seed=1)
    V = V_all[:n]
    results.append(pair("lens", lambda: token_score_stats(V, W_U, progress=False),
                        lambda: V @ W_U, device, args.repeats, rows=n, d_vocab=s["d_vocab"]))
    del W_U

    n = rows("reads", s["d_mlp"])
    W_Q = randn(s["n_heads"], s["d_model"], s["d_head"], device=device, seed=2)
    W_K = randn(s["n_kv_heads"], s["d_model"], s["d_head"], device=device, seed=3)
    W_V = randn(s["n_kv_heads"], s["d_model"], s["d_head"], device=device, seed=4)
    W_O = randn(s["n_heads"], s["d_head"], s["d_model"], device=device, seed=5)
    flat = [W.permute(1, 0, 2).reshape(s["d_model"], -1) for W in (W_Q, W_K, W_V)]
    V = V_all[:n]
    row = pair("reads", lambda: head_reads(V, W_Q, W_K, W_V, W_O, progress=False),
               lambda: [V @ W for W in flat], device, args.repeats, rows=n,
               n_heads=s["n_heads"], n_kv_heads=s["n_kv_heads"])
    # the per-call set-up (the QR of every head's W_O) does not depend on the rows: one row measures it
    row["setup_one_row"] = median_time(lambda: head_reads(V[:1], W_Q, W_K, W_V, W_O, progress=False), device,
                                       args.repeats)
    per_rows = row["kernel"]["median_s"] - row["setup_one_row"]["median_s"]
    row["ratio_without_setup"] = per_rows / row["bare_product"]["median_s"]
    print(f"{'':10s} of which set-up (one row) {row['setup_one_row']['median_s']:.3f} s; without it, ratio "
          f"{row['ratio_without_setup']:.2f}", flush=True)
    results.append(row)
    del W_Q, W_K, W_V, W_O, flat

    n = rows("alignment", s["sae_features"])
    W_dec = randn(n, s["d_model"], device=device, seed=6)
    results.append(pair("alignment", lambda: ffkv.max_cosine(W_dec, V_all), lambda: W_dec @ V_all.T, device,
                        args.repeats, rows=n, against=s["d_mlp"]))
    results.append(pair("both_ways", lambda: ffkv.max_cosine_both(W_dec, V_all),
                        lambda: (ffkv.max_cosine(W_dec, V_all), ffkv.max_cosine(V_all, W_dec)), device,
                        args.repeats, rows=n, against=s["d_mlp"]))

    out = REPO / "bench" / "results" / f"ffkv-{device}-{dt.date.today().isoformat()}.json"
    atomic_write_json(out, {"shape": s, "environment": environment(device), "repeats": args.repeats, "results": results})
    print(f"results: {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
