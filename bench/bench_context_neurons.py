#!/usr/bin/env python
"""Cost of chapter 5 (context neurons) at the demo's and GPT-2 small's layer-0 shapes, in one run on one
device.

    .venv/bin/python bench/bench_context_neurons.py [--quick] [--device cpu|cuda] [--repeats 3]

Random weights of the right shapes (a one-block TransformerLens model: rotary/RMSNorm/SwiGLU for the demo,
learned positions/LayerNorm/GELU for GPT-2 small). Each of the chapter's kernels is timed on the calibration
windows and set against the forward pass of the block that produced them (the cost the chapter cannot avoid):

    forward          run_with_cache up to block 0 on the calibration windows (the reference, ratio 1)
    kernel           mean pattern, spread and content TV of every head
    token_weights    token weights and sampled denominators of the summarised heads
    extended         extended embeddings of the summarised heads for the whole vocabulary
    summary          the linear summary on the windows
    context_stats    per-neuron context and current-token spreads over the vocabulary (streamed over neurons)

--quick uses fewer windows and, at GPT-2 shape, an 8,192-token slice of the vocabulary (the full one needs a
few GB). Results: bench/results/context-neurons-<device>-<date>[-quick].json, written atomically.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))

from weightscope.chapters.context_neurons import layer_pass  # noqa: E402
from weightscope.compute import context_neurons as cn  # noqa: E402
from weightscope.compute import positional_kernels as pk  # noqa: E402

SHAPES = {  # layer-0 shapes; `stable`: heads summarised (the paper's six for GPT-2 small)
    "demo": dict(d_model=64, n_heads=8, n_kv=4, d_head=8, d_mlp=172, d_vocab=512, window=128, windows=64,
                 stable=8, arch="llama"),
    "gpt2-small": dict(d_model=768, n_heads=12, n_kv=None, d_head=64, d_mlp=3072, d_vocab=50257, window=128,
                       windows=64, stable=6, arch="gpt2"),
}


def block(shape: dict, device: str) -> HookedTransformer:
    common = dict(n_layers=1, d_model=shape["d_model"], n_ctx=shape["window"], d_head=shape["d_head"],
                  n_heads=shape["n_heads"], d_mlp=shape["d_mlp"], d_vocab=shape["d_vocab"], device=device,
                  seed=0)
    if shape["arch"] == "gpt2":
        cfg = HookedTransformerConfig(**common, act_fn="gelu_new", normalization_type="LN",
                                      positional_embedding_type="standard")
    else:
        cfg = HookedTransformerConfig(**common, act_fn="silu", gated_mlp=True, normalization_type="RMS",
                                      positional_embedding_type="rotary", rotary_dim=shape["d_head"],
                                      n_key_value_heads=shape["n_kv"])
    return HookedTransformer(cfg).eval()


def timed(fn, repeats: int, device: str) -> dict:
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        runs.append(time.perf_counter() - t)
    return {"median_s": statistics.median(runs), "runs_s": runs}


def bench_shape(name: str, shape: dict, *, device: str, repeats: int, quick: bool) -> dict:
    shape = dict(shape)
    if quick:
        shape["windows"] = 16
    model = block(shape, device)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, shape["d_vocab"], (shape["windows"], shape["window"]), generator=g)
    lp = layer_pass(model, tokens, 0, batch=16)
    heads = list(range(shape["stable"]))
    attn, ln = model.blocks[0].attn, model.blocks[0].ln1
    vocab = slice(0, 8192) if quick and shape["d_vocab"] > 8192 else slice(None)
    W_E = model.W_E[vocab].float().cpu()
    centred = shape["arch"] == "gpt2"
    weights = (ln.w.cpu(), ln.b.cpu() if centred else None, attn.W_V[heads].cpu(), attn.b_V[heads].cpu(),
               attn.W_O[heads].cpu())
    K = lp.pattern.mean(0)[heads]
    e_tok = cn.extended_embeddings(W_E, *weights, 0.2, centred=centred)
    w = cn.token_weights(tokens, lp.pattern[:, heads], K, shape["d_vocab"])[:, vocab]
    u = model.blocks[0].mlp.W_in.float().cpu()
    k = pk.relative_kernel(K, min_query=shape["window"] // 2)
    p = torch.rand(W_E.shape[0], generator=g)
    small = tokens.clamp(max=W_E.shape[0] - 1)

    steps = {
        "forward": lambda: layer_pass(model, tokens, 0, batch=16),
        "kernel": lambda: (pk.effective_tokens(lp.pattern), pk.content_tv(lp.pattern, lp.pattern.mean(0))),
        "token_weights": lambda: cn.kernel_denominators(
            tokens, K, cn.token_weights(tokens, lp.pattern[:, heads], K, shape["d_vocab"])),
        "extended": lambda: cn.extended_embeddings(W_E, *weights, 0.2, centred=centred),
        "summary": lambda: cn.linear_summary(small, K, e_tok, None, w),
        "context_stats": lambda: cn.context_stats(e_tok * w[..., None], W_E, u, p, k),
    }
    out = {name_: timed(fn, repeats, device) for name_, fn in steps.items()}
    ref = out["forward"]["median_s"]
    for entry in out.values():
        entry["ratio_to_forward"] = entry["median_s"] / ref
    return {"shape": shape, "vocab_used": W_E.shape[0], "steps": out}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    results = {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "quick": args.quick, "date": dt.date.today().isoformat(), "shapes": {}}
    for name, shape in SHAPES.items():
        print(f"[bench] context neurons at {name} shape ...", flush=True)
        results["shapes"][name] = bench_shape(name, shape, device=args.device, repeats=args.repeats,
                                              quick=args.quick)
        for step, r in results["shapes"][name]["steps"].items():
            print(f"  {step:>14s}: {r['median_s'] * 1e3:9.1f} ms  ({r['ratio_to_forward']:.2f} x forward)")
    folder = REPO / "bench" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"context-neurons-{args.device}-{results['date']}{'-quick' if args.quick else ''}.json"
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, path)
    print(f"[bench] written {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
