"""The full model's forward pass with its matrices in TransformerLens's own layout (contiguous, as its
`from_pretrained` makes them) against the layout that forward pass reads them in
(`load.hooked.forward_layout`, what `load_full_model` gives): TransformerLens 3.9 takes a gated MLP's three
matrices and the unembedding to `W.T.contiguous()`, and W_Q, W_K, W_V, W_O through a rearrange, at every call,
a whole copy each when they are contiguous. One block of Gemma-2-2B's width with its real vocabulary
(256,000 x 2,304, random weights), fp32: a 1-token step of generation (logits of one position), a batch of
chapter 7's shape to the last block's output (no logits), and the same batch to logits. The two layouts
alternate round by round on one model (the relayout is not timed); their outputs are compared bit for bit."""

from __future__ import annotations

import harness

NAME = "forward_layout"
ORDER = 2
SHAPE = {"d_model": 2304, "d_vocab": 256_000, "d_mlp": 9216, "n_heads": 8, "n_kv_heads": 4, "d_head": 256}
PLANS = {(device, quick): {"rows": 1 if quick else 4, "row_len": 128, "n_layers": 1}
         for device in ("cpu", "cuda") for quick in (False, True)}


def _model(plan: dict, device: str):
    """A random one-block Gemma-2 `HookedTransformer` of the real widths, TransformerLens's own layout."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    s = SHAPE
    cfg = HookedTransformerConfig(
        n_layers=plan["n_layers"], d_model=s["d_model"], d_head=s["d_head"], n_heads=s["n_heads"],
        n_key_value_heads=s["n_kv_heads"], d_mlp=s["d_mlp"], d_vocab=s["d_vocab"], n_ctx=plan["row_len"],
        act_fn="gelu", normalization_type="RMS", positional_embedding_type="rotary",
        rotary_dim=s["d_head"], gated_mlp=True, final_rms=True, use_normalization_before_and_after=True,
        original_architecture="Gemma2ForCausalLM", device=device, init_weights=False)
    model = HookedTransformer(cfg, move_to_device=True).eval()
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(harness.randn(tuple(p.shape), seed=10 + i, device=device, scale=p.shape[-1] ** -0.5))
    return model


def _own_layout(model) -> None:
    """Every matrix contiguous in TransformerLens's layout (as its `from_pretrained` leaves them)."""
    for p in model.parameters():
        p.data = p.data.contiguous()


def run(ctx: harness.Context) -> list[dict]:
    import statistics
    import time

    import torch

    from weightscope.load.hooked import forward_layout

    plan = ctx.plan
    harness.log(f"forward_layout: one Gemma-2-2B-width block, vocabulary {SHAPE['d_vocab']:,}, "
                f"batch {plan['rows']} x {plan['row_len']}")
    model = _model(plan, ctx.device)
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(0, SHAPE["d_vocab"], (plan["rows"], plan["row_len"]), generator=gen).to(ctx.device)
    step = batch[:1, :1]
    calls = {"step_logits": lambda: model(step),
             "batch_to_last_block": lambda: model(batch, stop_at_layer=plan["n_layers"]),
             "batch_logits": lambda: model(batch)}
    layouts = {"own": _own_layout, "forward": forward_layout}
    samples = {(lay, c): [] for lay in layouts for c in calls}
    outputs = {}
    with torch.no_grad():
        for round_ in range(ctx.repeats + 1):  # round 0 warms up
            for lay in (list(layouts) if round_ % 2 else list(layouts)[::-1]):
                layouts[lay](model)
                for name, call in calls.items():
                    harness.sync(ctx.device)
                    start = time.perf_counter()
                    out = call()
                    harness.sync(ctx.device)
                    if round_:
                        samples[(lay, name)].append(time.perf_counter() - start)
                    outputs[(lay, name)] = out
    result = {**ctx.meta, "benchmark": NAME, **SHAPE, **plan, "repeats": ctx.repeats}
    for name in calls:
        own, fwd = (statistics.median(samples[(lay, name)]) for lay in layouts)
        same = torch.equal(outputs[("own", name)], outputs[("forward", name)])
        result[name] = {"own_layout_s": own, "forward_layout_s": fwd, "ratio": own / fwd,
                        "bitwise_equal": same}
    return [result]


def table(rows: list[dict], report: dict) -> str:
    lines = ["| call | batch | TransformerLens's layout | the forward pass's layout | ratio "
             "| outputs equal |", "|---|---|---|---|---|---|"]
    for r in rows:
        batch = f"{r['rows']} x {r['row_len']}"
        for name, what in (("step_logits", "1 token"), ("batch_to_last_block", batch),
                           ("batch_logits", batch)):
            c = r[name]
            lines.append(f"| {name.replace('_', ' ')} | {what} | {c['own_layout_s'] * 1e3:.1f} ms "
                         f"| {c['forward_layout_s'] * 1e3:.1f} ms | {c['ratio']:.2f} "
                         f"| {'bit for bit' if c['bitwise_equal'] else 'NO'} |")
    return "\n".join(lines) + "\n"
