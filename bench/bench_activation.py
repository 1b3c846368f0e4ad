"""GPT-2's activation in the forward passes of chapters 0 and 4-7: TransformerLens's `gelu_new` (six
elementwise passes, each writing a new [tokens, d_mlp] tensor) against `load.models.tanh_gelu` (torch's tanh
GELU, the same formula in one pass, what `load_full_model` installs), alone and inside a TransformerLens MLP
block of GPT-2 small's width, on 8,192 tokens (chapter 6's held-out checks in one batch). Each one's largest
error against the formula evaluated in float64 is recorded beside the times."""

from __future__ import annotations

import harness

NAME = "activation"
ORDER = 2
SHAPE = {"d_model": 768, "d_mlp": 3072}  # GPT-2 small's
PLANS = {(device, quick): {"tokens": 1024 if quick else 8192} for device in ("cpu", "cuda")
         for quick in (False, True)}


def _errors(x, fns: dict) -> dict[str, float]:
    """{name: max |fn(x) - formula(x) in float64|}."""
    import math

    import torch

    x64 = x.double()
    exact = 0.5 * x64 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64**3)))
    return {name: float((fn(x).double() - exact).abs().max()) for name, fn in fns.items()}


def run(ctx: harness.Context) -> list[dict]:
    import torch
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.components import MLP
    from transformer_lens.utilities.activation_functions import gelu_new

    from weightscope.load.models import tanh_gelu

    n, d, m = ctx.plan["tokens"], SHAPE["d_model"], SHAPE["d_mlp"]
    harness.log(f"activation: [{n:,} x {m:,}] alone and in an MLP block [{n:,} x {d}] -> [{n:,} x {d}]")
    cfg = HookedTransformerConfig(n_layers=1, d_model=d, d_head=64, n_heads=12, d_mlp=m, n_ctx=1024,
                                  d_vocab=50257, act_fn="gelu_new", device=ctx.device)
    mlp = MLP(cfg).to(ctx.device)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(harness.randn(tuple(p.shape), seed=3, device=ctx.device, scale=d**-0.5))
    x = harness.randn((n, 1, d), seed=2, device=ctx.device)
    pre = harness.randn((n, m), seed=4, device=ctx.device, scale=2.0)

    def block(act):
        def call():
            mlp.act_fn = act
            with torch.no_grad():
                return mlp(x)
        return call

    routes = {"gelu_new": lambda: gelu_new(pre), "tanh_gelu": lambda: tanh_gelu(pre),
              "mlp_gelu_new": block(gelu_new), "mlp_tanh_gelu": block(tanh_gelu)}
    timed = harness.time_interleaved(routes, repeats=ctx.repeats, device=ctx.device)
    errors = _errors(pre, {"gelu_new": gelu_new, "tanh_gelu": tanh_gelu})
    same_share = float((gelu_new(pre) == tanh_gelu(pre)).float().mean())
    mlp_diff = float((routes["mlp_gelu_new"]() - routes["mlp_tanh_gelu"]()).abs().max())
    return [{**ctx.meta, "benchmark": NAME, "tokens": n, **SHAPE, **timed,
             "max_error_vs_float64": errors, "bitwise_equal_share": same_share, "mlp_max_abs_diff": mlp_diff,
             "ratio_activation": timed["gelu_new"]["median_s"] / timed["tanh_gelu"]["median_s"],
             "ratio_mlp": timed["mlp_gelu_new"]["median_s"] / timed["mlp_tanh_gelu"]["median_s"]}]


def table(rows: list[dict], report: dict) -> str:
    lines = ["| tokens | gelu_new | tanh_gelu | ratio | MLP block with gelu_new | with tanh_gelu | ratio "
             "| largest error vs float64: gelu_new / tanh_gelu | equal bits | MLP outputs differ by |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r["max_error_vs_float64"]
        lines.append(f"| {r['tokens']:,} | {harness.ms(r['gelu_new'])} | {harness.ms(r['tanh_gelu'])} "
                     f"| {r['ratio_activation']:.1f} | {harness.ms(r['mlp_gelu_new'])} "
                     f"| {harness.ms(r['mlp_tanh_gelu'])} | {r['ratio_mlp']:.2f} "
                     f"| {e['gelu_new']:.1e} / {e['tanh_gelu']:.1e} | {r['bitwise_equal_share']:.1%} "
                     f"| {r['mlp_max_abs_diff']:.1e} |")
    return "\n".join(lines) + "\n"
