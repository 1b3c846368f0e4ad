"""The whole chapter-1 kernel work of an SAE suite: per layer, both sides (`token_score_stats` of W_dec
against the folded unembedding and of W_enc.T against W_E.T) of random Gemma-2-2B-shaped weights (bf16 on a
GPU, fp32 on a CPU), fused and eager, against the same products alone in the chunks the kernel would use
(the full score matrices would not fit)."""

from __future__ import annotations

import bench_kernel
import harness

NAME = "chapter1"
ORDER = 3
LAYERS_MODEL = 26  # Gemma-2-2B
# SAE layers and features per layer (None: all 16,384) in the suite.
PLANS = {
    ("cpu", False): {"layers": 2, "features": 32},
    ("cpu", True): {"layers": 1, "features": 8},
    ("cuda", False): {"layers": LAYERS_MODEL, "features": None},
    ("cuda", True): {"layers": 4, "features": None},
}


def run(ctx: harness.Context) -> dict:
    import torch

    from weightscope.compute.streaming import auto_chunk_size
    from weightscope.compute.token_scores import token_score_stats

    device, layers, features = ctx.device, ctx.plan["layers"], ctx.plan["features"]
    harness.log(f"chapter1: {layers} layers x {features or 'all'} features x 2 sides")
    shape, top_k = bench_kernel.SHAPES["gemma-2-2b"], bench_kernel.TOP_K
    d, V = shape["d_model"], shape["d_vocab"]
    n = shape["n_features"] if features is None else min(features, shape["n_features"])
    # bf16 as the book runs on a GPU; on a CPU the chapters compute in fp32: without AVX-512-BF16/AMX,
    # torch's CPU bf16 product is emulated, ~35x slower than fp32 on this benchmark's CPU
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    M_out = harness.randn((d, V), seed=1, device=device, scale=d**-0.5, dtype=dtype)
    M_in = harness.randn((d, V), seed=8, device=device, scale=d**-0.5, dtype=dtype)
    suite = [(harness.randn((n, d), seed=100 + layer, device=device, dtype=dtype),  # W_dec of the layer's SAE
              harness.randn((n, d), seed=200 + layer, device=device, dtype=dtype))  # W_enc.T
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
        def run_suite():
            for W_dec, W_enc_T in suite:
                token_score_stats(W_dec, M_out, k=top_k, progress=False, fused=fused)
                token_score_stats(W_enc_T, M_in, k=top_k, progress=False, fused=fused)
        return run_suite

    timed = harness.time_interleaved({"bare_products": bare, "chapter1_fused": analysis(True),
                                      "chapter1_eager": analysis(False)}, repeats=ctx.repeats, device=device)
    flops = 2.0 * 2 * layers * n * d * V
    del suite, M_out, M_in, buffer
    harness.release(device)
    t_bare = timed["bare_products"]["median_s"]
    result = {
        **ctx.meta, "benchmark": "chapter1", "dtype": str(dtype).removeprefix("torch."),
        "shape": "gemma-2-2b", "d_model": d, "d_vocab": V, "layers": layers, "layers_model": LAYERS_MODEL, "n_features": n,
        "n_features_model": shape["n_features"], "sides": 2, "chunk_size": chunk, "flop": flops,
        **{name: {**t, "flop_per_s": flops / t["median_s"]} for name, t in timed.items()},
        "ratio_fused_over_bare": timed["chapter1_fused"]["median_s"] / t_bare,
        "ratio_eager_over_bare": timed["chapter1_eager"]["median_s"] / t_bare,
    }
    harness.log(f"  ratio fused / bare = {result['ratio_fused_over_bare']:.2f}")
    return result


def table(r: dict, report: dict) -> str:
    suite = "all layers" if r["layers"] == r["layers_model"] else "a subset"
    return "\n".join([
        f"| chapter 1, gemma-2-2b shape, {r['dtype']} | layers x features x sides | chunk | bare products "
        "| fused kernel | ratio | eager kernel | ratio | TFLOP/s (bare / fused) |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {suite} | {r['layers']} x {r['n_features']:,} x 2 | {r['chunk_size']:,} "
        f"| {r['bare_products']['median_s']:.2f} s | {r['chapter1_fused']['median_s']:.2f} s "
        f"| {r['ratio_fused_over_bare']:.2f} | {r['chapter1_eager']['median_s']:.2f} s "
        f"| {r['ratio_eager_over_bare']:.2f} | {r['bare_products']['flop_per_s'] / 1e12:.2f} / "
        f"{r['chapter1_fused']['flop_per_s'] / 1e12:.2f} |"]) + "\n"
