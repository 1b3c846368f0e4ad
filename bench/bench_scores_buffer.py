"""Where a CPU product writes its scores: a fresh tensor per chunk, one reused buffer with rows packed
d_vocab apart, or one reused buffer with rows on 64-byte lines (`streaming.scores_buffer`, what chapters 1, 4
and 6 use). At GPT-2 small's vocabulary (50,257 columns, not a multiple of 16) the product itself, and
chapter 1's `token_score_stats` with each buffer, on one chunk of the size the kernel chooses (a 1 GiB
working set: scores and scratch). The buffer lives on the CPU only; on a GPU this benchmark records
nothing."""

from __future__ import annotations

import harness

NAME = "scores_buffer"
ORDER = 2
SHAPE = {"d_model": 768, "d_vocab": 50257}  # GPT-2's; Gemma's 256,000 and Llama's 128,256 are aligned
_ROWS = {False: None, True: 1024}  # features: one budget-sized chunk (None) or, quick, fewer
PLANS = {(device, quick): {"rows": _ROWS[quick]} for device in ("cpu", "cuda") for quick in (False, True)}


def run(ctx: harness.Context) -> list[dict]:
    import torch

    from weightscope.compute import streaming
    from weightscope.compute import token_scores as K

    if ctx.device != "cpu":
        harness.log("scores_buffer: CPU only (a GPU's caching allocator reuses memory); nothing to time")
        return []
    d, V = SHAPE["d_model"], SHAPE["d_vocab"]
    n = ctx.plan["rows"] or streaming.auto_chunk_size(V, torch.float32, torch.device("cpu"))
    harness.log(f"scores_buffer: [{n:,} x {d}] @ [{d} x {V:,}]")
    D = harness.randn((n, d), seed=2, device="cpu")
    M = harness.randn((d, V), seed=1, device="cpu", scale=d**-0.5)
    packed, aligned = torch.empty(n, V), streaming.scores_buffer(n, V)

    def kernel(buffer_fn):
        def call():
            original = K.scores_buffer
            K.scores_buffer = buffer_fn  # the kernel's only choice that differs between the two routes
            try:
                return K.token_score_stats(D, M, k=10, progress=False, chunk_size=n)
            finally:
                K.scores_buffer = original
        return call

    def packed_buffer(rows, cols, dtype=torch.float32):
        return torch.empty(rows, cols, dtype=dtype)

    routes = {"fresh": lambda: torch.matmul(D, M), "packed": lambda: torch.matmul(D, M, out=packed),
              "aligned": lambda: torch.matmul(D, M, out=aligned),
              "kernel_packed": kernel(packed_buffer), "kernel_aligned": kernel(streaming.scores_buffer)}
    timed = harness.time_interleaved(routes, repeats=ctx.repeats, device="cpu")  # warm-up compiles the kernel
    a, b = routes["kernel_packed"](), routes["kernel_aligned"]()
    stats = ("top_ids", "bottom_ids", "mean", "std", "kurtosis", "entropy")
    same = torch.equal(packed, aligned) and all(torch.equal(getattr(a, f), getattr(b, f)) for f in stats)
    flops = 2.0 * n * d * V
    return [{**ctx.meta, "benchmark": NAME, "rows": n, **SHAPE, "flop": flops, "identical_results": same,
             "ld_aligned": aligned.stride(0),
             **{name: {**t, "flop_per_s": flops / t["median_s"]} for name, t in timed.items()},
             "ratio_packed_over_aligned": timed["packed"]["median_s"] / timed["aligned"]["median_s"],
             "ratio_kernel_packed_over_aligned":
                 timed["kernel_packed"]["median_s"] / timed["kernel_aligned"]["median_s"]}]


def table(rows: list[dict], report: dict) -> str:
    lines = ["| product | rows | fresh tensor | buffer, rows packed | buffer, rows on 64-byte lines "
             "| packed / aligned | token_score_stats packed / aligned | identical |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rate = {k: f"{harness.ms(r[k])} ({r[k]['flop_per_s'] / 1e9:.0f} GFLOP/s)"
                for k in ("fresh", "packed", "aligned")}
        lines.append(f"| [rows x {r['d_model']}] @ [{r['d_model']} x {r['d_vocab']:,}] | {r['rows']:,} "
                     f"| {rate['fresh']} | {rate['packed']} | {rate['aligned']} "
                     f"| {r['ratio_packed_over_aligned']:.2f} | {harness.ms(r['kernel_packed'])} / "
                     f"{harness.ms(r['kernel_aligned'])} = {r['ratio_kernel_packed_over_aligned']:.2f} "
                     f"| {r['identical_results']} |")
    return "\n".join(lines) + "\n"
