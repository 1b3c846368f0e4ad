"""Chapter 2's `head_reads` against its three fused products D @ W_Q, D @ W_K, D @ W_V (and a direct route
through W_O per head), at Gemma-2-2B's attention shape and chapter 2's call size: every feature of a 16k SAE
and 4,096 null rows in one call (on CPU with --quick, fewer)."""

from __future__ import annotations

import harness

NAME = "attention"
ORDER = 4
# Gemma-2-2B attention: 8 query heads of 256, 4 key/value heads; its 16k-wide SAEs. Chapter 2 reads the
# features and 4,096 null rows in one call per layer: 20,480 rows.
GEMMA_ATTENTION = {"d_model": 2304, "n_heads": 8, "n_kv_heads": 4, "d_head": 256, "n_features": 16384,
                   "n_null": 4096}
# Rows read (None: one whole chapter-2 call).
PLANS = {
    ("cpu", False): {"rows": None},
    ("cpu", True): {"rows": 1024},
    ("cuda", False): {"rows": None},
    ("cuda", True): {"rows": None},
}


def run(ctx: harness.Context) -> dict:
    import torch

    from weightscope.compute.attention import head_reads, kv_head_index

    a, device = GEMMA_ATTENTION, ctx.device
    d, nh, nkv, dh = a["d_model"], a["n_heads"], a["n_kv_heads"], a["d_head"]
    rows = a["n_features"] + a["n_null"]
    n = rows if ctx.plan["rows"] is None else min(ctx.plan["rows"], rows)
    harness.log(f"attention: head_reads at gemma-2-2b shape ({n:,} rows)")
    W_Q = harness.randn((nh, d, dh), seed=3, device=device, scale=d**-0.5)
    W_K = harness.randn((nkv, d, dh), seed=4, device=device, scale=d**-0.5)
    W_V = harness.randn((nkv, d, dh), seed=5, device=device, scale=d**-0.5)
    W_O = harness.randn((nh, dh, d), seed=6, device=device, scale=dh**-0.5)
    D = harness.randn((n, d), seed=7, device=device)
    flat = {name: W.permute(1, 0, 2).reshape(d, -1).contiguous()
            for name, W in (("Q", W_Q), ("K", W_K), ("V", W_V))}
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
    timed = harness.time_interleaved({
        "bare": bare,
        "head_reads": lambda: head_reads(D, W_Q, W_K, W_V, W_O, progress=False),
        # one row: the call's fixed cost (flattened weights, the QR of every W_O[h]) and almost nothing else
        "one_row": lambda: head_reads(D[:1], W_Q, W_K, W_V, W_O, progress=False),
        "direct": direct,
    }, repeats=ctx.repeats, device=device)
    t_bare, t_kernel, t_direct = timed["bare"], timed["head_reads"], timed["direct"]
    t_setup = timed["one_row"]
    reads_s = max(t_kernel["median_s"] - t_setup["median_s"], 1e-9)
    reads = head_reads(D, W_Q, W_K, W_V, W_O, progress=False)
    q, _, v = (x.cpu() for x in direct())
    agree = {"q": float(((reads["q"] - q).abs() / q.abs()).max()),
             "v": float(((reads["v"] - v).abs() / v.abs()).max())}
    result = {
        **ctx.meta, "benchmark": "attention", "shape": "gemma-2-2b attention", **a, "n_features_model": rows,
        "n_features": n, "flop_bare": flops,
        "bare_products": {**t_bare, "flop_per_s": flops / t_bare["median_s"]},
        "head_reads": {**t_kernel, "flop_per_s": flops / t_kernel["median_s"]},
        "direct_through_W_O": t_direct,
        "head_reads_setup": t_setup,
        "head_reads_without_setup": {"median_s": reads_s, "flop_per_s": flops / reads_s,
                                     "derived": "head_reads median minus head_reads_setup median"},
        "setup_note": "head_reads' per-call set-up (flattening W_Q/W_K/W_V and the QR of every W_O[h], which "
                      "replaces z @ W_O[h] by z @ R_h^T), measured as head_reads on one row through the "
                      "public API; head_reads_without_setup is the difference of the medians, not a timing",
        "ratio_kernel_over_bare": t_kernel["median_s"] / t_bare["median_s"],
        "ratio_kernel_without_setup_over_bare": reads_s / t_bare["median_s"],
        "ratio_direct_over_kernel": t_direct["median_s"] / t_kernel["median_s"],
        "max_rel_diff_kernel_vs_direct": agree,
    }
    harness.log(f"  ratio head_reads / bare = {result['ratio_kernel_over_bare']:.2f}")
    return result


def table(r: dict, report: dict) -> str:
    return "\n".join([
        "| gemma-2-2b attention | features | bare products | head_reads | ratio | set-up (QR) | "
        "head_reads without set-up | ratio | through W_O | GFLOP/s (bare / kernel) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| 8 heads x 256, 4 kv heads | {r['n_features']:,} | {harness.ms(r['bare_products'])} "
        f"| {harness.ms(r['head_reads'])} | {r['ratio_kernel_over_bare']:.2f} "
        f"| {harness.ms(r['head_reads_setup'])} | {harness.ms(r['head_reads_without_setup'])} "
        f"| {r['ratio_kernel_without_setup_over_bare']:.2f} | {harness.ms(r['direct_through_W_O'])} "
        f"| {r['bare_products']['flop_per_s'] / 1e9:.1f} / "
        f"{r['head_reads']['flop_per_s'] / 1e9:.1f} |"]) + "\n"
