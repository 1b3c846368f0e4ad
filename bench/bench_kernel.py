"""Chapter 1's `token_score_stats(D, M)`, eager and fused (torch.compile), against the bare product `D @ M` of
the same shape and against the usual route (the full product, then statistics and top-k), at the demo,
GPT-2-small and Gemma-2-2B shapes; on CPU a subset of the features."""

from __future__ import annotations

import harness

NAME = "kernel"
ORDER = 1
TOP_K = 10
# Token-lens shapes: d_model, d_vocab, and the SAE width (features) the book uses at that model.
SHAPES = {
    "demo": {"d_model": 64, "d_vocab": 512, "n_features": 512},
    "gpt2-small": {"d_model": 768, "d_vocab": 50257, "n_features": 24576},
    "gemma-2-2b": {"d_model": 2304, "d_vocab": 256000, "n_features": 16384},
}
# Features scored per shape (None: all).
PLANS = {
    ("cpu", False): {"subset": {"demo": None, "gpt2-small": 512, "gemma-2-2b": 64}},
    ("cpu", True): {"subset": {"demo": None, "gpt2-small": 128, "gemma-2-2b": 16}},
    ("cuda", False): {"subset": {"demo": None, "gpt2-small": None, "gemma-2-2b": None}},
    ("cuda", True): {"subset": {"demo": None, "gpt2-small": 4096, "gemma-2-2b": 2048}},
}


def naive_token_stats(D, M, k: int = TOP_K) -> dict:
    """The usual route, which the kernel replaces: the whole score matrix, then whole-matrix torch ops."""
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
    out = {"top_ids": top_ids, "top_scores": top_scores, "bottom_ids": bottom_ids,
           "bottom_scores": bottom_scores, "max": smax, "min": bottom_scores[:, 0], "mean": mean, "std": std,
           "top_z": (smax - mean) / std, "skew": m3 / m2.pow(1.5), "kurtosis": m4 / m2.square() - 3.0,
           "entropy": entropy}
    return {name: value.cpu() for name, value in out.items()}


def _threads(ctx: harness.Context) -> list[int]:
    import torch

    if ctx.options.get("kernel_threads"):
        return [int(t) for t in ctx.options["kernel_threads"].split(",")]
    default = torch.get_num_threads()
    # one thread too: on a shared CPU, many small parallel ops wait on descheduled threads
    return [default] + ([1] if ctx.device == "cpu" and default > 1 and not ctx.quick else [])


def run(ctx: harness.Context) -> list[dict]:
    import torch

    default = torch.get_num_threads()
    rows = []
    try:
        for count in _threads(ctx):
            torch.set_num_threads(count)
            for name in SHAPES:
                harness.log(f"kernel: {name} ({ctx.plan['subset'][name] or 'all'} features, {count} threads)")
                rows.append({**measure(name, ctx.plan["subset"][name], ctx), "torch_threads": count})
                harness.log(f"  ratio kernel / D@M = {rows[-1]['ratio_kernel_over_matmul']:.2f} (eager), "
                            f"{rows[-1]['ratio_fused_over_matmul']:.2f} (fused)")
    finally:
        torch.set_num_threads(default)
    return rows


def _agreement(D, M, m: int) -> dict:
    """Max relative difference of the kernel's statistics from the usual route's on the first m features."""
    from weightscope.compute.token_scores import token_score_stats

    ref = naive_token_stats(D[:m], M)
    agree = {}
    for label, fused in (("eager", False), ("fused", True)):
        got = token_score_stats(D[:m], M, k=TOP_K, progress=False, fused=fused)
        agree[label] = {stat: float((getattr(got, stat) - ref[stat].float()).abs().max()
                                    / (ref[stat].float().abs().max() + 1e-30))
                        for stat in ("top_scores", "bottom_scores", "mean", "std", "kurtosis", "entropy")}
    return agree


def measure(name: str, subset: int | None, ctx: harness.Context) -> dict:
    from weightscope.compute.streaming import is_oom
    from weightscope.compute.token_scores import token_score_stats

    shape, device = SHAPES[name], ctx.device
    d, V = shape["d_model"], shape["d_vocab"]
    n = shape["n_features"] if subset is None else min(subset, shape["n_features"])
    M = harness.randn((d, V), seed=1, device=device, scale=d**-0.5)
    D = harness.randn((n, d), seed=2, device=device)
    flops = 2.0 * n * d * V
    reps = ctx.repeats * 20 if flops < 1e9 else ctx.repeats  # the demo shape: many repeats, stable medians
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
        if not (isinstance(err, MemoryError) or is_oom(err)):
            raise
        naive_error = f"out of memory: {str(err).splitlines()[0][:200]}"
        del routes["naive_route"]
        harness.release(device)
    # the warm-up call compiles the fused route
    timed = harness.time_interleaved(routes, repeats=reps, device=device)
    matmul, kernel, naive = timed["matmul"], timed["token_score_stats"], timed.get("naive_route")
    fused = timed["token_score_stats_fused"]
    m = min(n, 256)  # agreement on (up to) 256 features: scores and statistics (ids may differ on ties)
    agree = _agreement(D, M, m)
    del D, M
    harness.release(device)
    return {
        **ctx.meta, "benchmark": "kernel", "shape": name, "d_model": d, "d_vocab": V,
        "n_features_model": shape["n_features"], "n_features": n, "k": TOP_K, "flop": flops,
        "matmul": {**matmul, "flop_per_s": flops / matmul["median_s"]},
        "token_score_stats": {**kernel, "flop_per_s": flops / kernel["median_s"], "fused": False},
        "token_score_stats_fused": {**fused, "flop_per_s": flops / fused["median_s"], "fused": True},
        "naive_route": ({**naive, "flop_per_s": flops / naive["median_s"]} if naive
                        else {"error": naive_error}),
        "ratio_kernel_over_matmul": kernel["median_s"] / matmul["median_s"],
        "ratio_fused_over_matmul": fused["median_s"] / matmul["median_s"],
        "ratio_naive_over_kernel": naive["median_s"] / kernel["median_s"] if naive else None,
        "ratio_naive_over_fused": naive["median_s"] / fused["median_s"] if naive else None,
        "max_rel_diff_kernel_vs_naive": agree, "agreement_features": m,
    }


def table(rows: list[dict], report: dict) -> str:
    threads = report["environment"]["torch_threads"]
    lines = ["| shape | features (of) | threads | D @ M | eager kernel | ratio | fused kernel | ratio "
             "| usual route | GFLOP/s (D @ M / eager / fused) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eager, fused = r["token_score_stats"], r.get("token_score_stats_fused")
        lines.append(
            f"| {r['shape']} ({r['d_model']} x {r['d_vocab']:,}) "
            f"| {r['n_features']:,} ({r['n_features_model']:,}) "
            f"| {r.get('torch_threads', threads)} | {harness.ms(r['matmul'])} "
            f"| {harness.ms(eager)} | {r['ratio_kernel_over_matmul']:.2f} "
            + (f"| {harness.ms(fused)} | {r['ratio_fused_over_matmul']:.2f} " if fused else "| | ")
            + (f"| {harness.ms(r['naive_route'])} " if "median_s" in r["naive_route"] else "| out of memory ")
            + f"| {r['matmul']['flop_per_s'] / 1e9:.1f} / {eager['flop_per_s'] / 1e9:.1f}"
            + (f" / {fused['flop_per_s'] / 1e9:.1f} |" if fused else " |"))
    return "\n".join(lines) + "\n"
