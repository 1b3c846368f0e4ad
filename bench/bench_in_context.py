#!/usr/bin/env python
"""Tokens per second of chapter 7's activation pass (`compute.in_context.firing_pass`) at the demo's and GPT-2
small's shapes, in one run on one device.

    .venv/bin/python bench/bench_in_context.py [--quick] [--device cpu|cuda] [--repeats 3]

Random weights of the right shapes (a TransformerLens model: rotary/RMSNorm/SwiGLU, 5 layers, for the demo;
learned positions/LayerNorm/GELU, 12 layers, for GPT-2 small) and one random ReLU SAE per measured layer
(512 features on the demo's 64 dimensions; 24,576 on GPT-2's 768). Two timings per shape, on the same rows:

    forward        the model's forward pass alone over the rows (the cost the chapter cannot avoid)
    firing_pass    the chapter's pass: forward, every SAE encoded, each feature's strongest firings merged

--quick reads fewer tokens. Results: bench/results/in-context-<device>-<date>[-quick].json, written
atomically.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))

from weightscope.compute import in_context as ic  # noqa: E402
from weightscope.io import atomic_write_json, versions  # noqa: E402

SHAPES = {
    "demo": dict(n_layers=5, d_model=64, n_heads=8, n_kv=4, d_head=8, d_mlp=172, d_vocab=512, n_ctx=512,
                 d_sae=512, sae_layers=(0, 1, 2, 3, 4), arch="llama"),
    "gpt2-small": dict(n_layers=12, d_model=768, n_heads=12, n_kv=None, d_head=64, d_mlp=3072, d_vocab=50257,
                       n_ctx=1024, d_sae=24576, sae_layers=(6,), arch="gpt2"),
}


class RandomSAE(torch.nn.Module):
    """A ReLU SAE with random weights and the fields `firing_pass` reads."""

    def __init__(self, d_in: int, d_sae: int, layer: int, device: str):
        super().__init__()
        gen = torch.Generator().manual_seed(layer)
        self.W_enc = (torch.randn(d_in, d_sae, generator=gen) / d_in ** 0.5).to(device)
        self.b_enc = torch.full((d_sae,), -1.5, device=device)  # about 7% of features active per token
        self.W_dec = torch.randn(d_sae, d_in, generator=gen).to(device)
        self.hook_name, self.layer = f"blocks.{layer}.hook_resid_post", layer
        self.d_in, self.d_sae = d_in, d_sae
        self.sae = self

    def encode(self, x):
        return torch.relu(x @ self.W_enc + self.b_enc)


def model_for(shape: dict, device: str) -> HookedTransformer:
    common = dict(n_layers=shape["n_layers"], d_model=shape["d_model"], n_ctx=shape["n_ctx"],
                  d_head=shape["d_head"], n_heads=shape["n_heads"], d_mlp=shape["d_mlp"],
                  d_vocab=shape["d_vocab"], device=device, seed=0)
    if shape["arch"] == "gpt2":
        cfg = HookedTransformerConfig(**common, act_fn="gelu_new", normalization_type="LN",
                                      positional_embedding_type="standard")
    else:
        cfg = HookedTransformerConfig(**common, act_fn="silu", gated_mlp=True, normalization_type="RMS",
                                      positional_embedding_type="rotary", rotary_dim=shape["d_head"],
                                      n_key_value_heads=shape["n_kv"])
    return HookedTransformer(cfg).eval()


def timed(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


@torch.no_grad()
def bench_shape(name: str, shape: dict, *, device: str, repeats: int, n_tokens: int, row_len: int,
                memory_mb: int) -> dict:
    model = model_for(shape, device)
    saes = [RandomSAE(shape["d_model"], shape["d_sae"], layer, device) for layer in shape["sae_layers"]]
    rows = max(1, n_tokens // row_len)
    tokens = torch.randint(1, shape["d_vocab"], (rows, row_len), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 0
    budget = memory_mb * 2**20
    n_keep = ic.keep_per_feature(budget // 2, len(saes), shape["d_sae"], 64)
    batch_rows = ic.batch_rows_for(budget // 2, row_len, shape["d_sae"], len(saes))

    def forward():
        for start in range(0, rows, batch_rows):
            model(tokens[start : start + batch_rows].to(device), return_type=None)

    def firing_pass():
        ic.firing_pass(model, saes, tokens, n_keep=n_keep, batch_rows=batch_rows, bos_id=0, progress=False)

    n = rows * row_len
    t_fwd, t_pass = timed(forward, repeats, device), timed(firing_pass, repeats, device)
    return {"shape": name, **{k: v for k, v in shape.items() if k != "sae_layers"},
            "saes": len(saes), "tokens": n, "row_len": row_len, "batch_rows": batch_rows,
            "kept_per_feature": n_keep, "memory_mb": memory_mb, "forward_s": t_fwd, "firing_pass_s": t_pass,
            "forward_tokens_per_s": n / t_fwd, "firing_pass_tokens_per_s": n / t_pass,
            "pass_over_forward": t_pass / t_fwd}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-mb", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    results = []
    for name, shape in SHAPES.items():
        n_tokens = (4096 if name == "demo" else 1024) if args.quick else (32768 if name == "demo" else 8192)
        r = bench_shape(name, shape, device=args.device, repeats=args.repeats, n_tokens=n_tokens, row_len=128,
                        memory_mb=args.memory_mb)
        print(f"{name}: {r['tokens']:,} tokens, forward {r['forward_tokens_per_s']:,.0f} tok/s, "
              f"firing pass {r['firing_pass_tokens_per_s']:,.0f} tok/s ({r['pass_over_forward']:.1f}x the "
              f"forward's time; {r['kept_per_feature']} firings kept per feature, batches of "
              f"{r['batch_rows']} rows)", flush=True)
        results.append(r)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    report = {"benchmark": "in_context", "device": args.device, "device_name": device_name,
              "threads": torch.get_num_threads(), "repeats": args.repeats, "quick": args.quick,
              "date": dt.date.today().isoformat(), "versions": versions(), "results": results}
    out = REPO / "bench" / "results" / (f"in-context-{args.device}-{dt.date.today().isoformat()}"
                                        f"{'-quick' if args.quick else ''}.json")
    atomic_write_json(out, report)
    print(f"written {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
