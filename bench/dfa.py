#!/usr/bin/env python
"""Throughput of chapter 4's DFA and recursive DFA, at the demo's and GPT-2 small's attention shapes.

    .venv/bin/python bench/dfa.py [--device cpu|cuda] [--repeats 5]

- - `dfa`: `compute.dfa.dfa` for every destination token of a batch of rows and its `l0` active features (the
  chapter's use: one split per active (token, feature)), reported as destination tokens per second; beside it
  the encoder product alone, z @ W_enc for the same tokens (what finding the active features costs), in the
  same run.
- - `rdfa`: `value_decomposition` + `rdfa` of one (head, source) part over a residual SAE of the model's
  width, reported as examples per second.

Random tensors of the real shapes (patterns are causal softmaxes); timings are medians after one warm-up.
Results go to bench/results/dfa-<device>-<date>.json."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))

from weightscope.compute import dfa as dfa_k  # noqa: E402

SHAPES = {  # n_heads, n_kv_heads, d_head, d_model, d_sae (attention SAE), d_sae_res, l0, ctx, rows
    "demo (stories260K)": dict(
        H=8, H_kv=4, d_head=8, d_model=64, d_sae=512, d_sae_res=512, l0=16, ctx=128, rows=16
    ),
    "gpt2-small": dict(
        H=12, H_kv=12, d_head=64, d_model=768, d_sae=24576, d_sae_res=24576, l0=20, ctx=128, rows=4
    ),
}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn, repeats: int, device: str) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_shape(name: str, s: dict, device: str, repeats: int) -> dict:
    from sae_lens import TopKSAE, TopKSAEConfig

    g = torch.Generator(device=device).manual_seed(0)
    B, T, H, Hkv, dh = s["rows"], s["ctx"], s["H"], s["H_kv"], s["d_head"]
    scores = torch.randn(B, H, T, T, generator=g, device=device)
    scores = scores.masked_fill(torch.ones(T, T, device=device, dtype=torch.bool).triu(1), float("-inf"))
    pattern = scores.softmax(-1)
    v = torch.randn(B, T, Hkv, dh, generator=g, device=device)
    W_enc = torch.randn(H * dh, s["d_sae"], generator=g, device=device) / (H * dh) ** 0.5
    n = B * T
    b = torch.arange(B, device=device).repeat_interleave(T * s["l0"])
    d = torch.arange(T, device=device).repeat_interleave(s["l0"]).repeat(B)
    f = torch.randint(0, s["d_sae"], (n * s["l0"],), generator=g, device=device)
    z = torch.randn(n, H * dh, generator=g, device=device)
    chunk = 512

    def run_dfa():
        for i in range(0, len(b), chunk):
            dfa_k.dfa(pattern, v, W_enc, b[i : i + chunk], d[i : i + chunk], f[i : i + chunk])

    t_dfa = median_time(run_dfa, repeats, device)
    t_enc = median_time(lambda: z @ W_enc, repeats, device)

    res = TopKSAE(TopKSAEConfig(d_in=s["d_model"], d_sae=s["d_sae_res"], k=s["l0"], device=device))
    x = torch.randn(s["d_model"], generator=g, device=device)
    W_V = torch.randn(Hkv, s["d_model"], dh, generator=g, device=device)
    b_V = torch.zeros(Hkv, dh, device=device)
    ln_w = torch.ones(s["d_model"], device=device)
    w_head = W_enc[:dh, 0]
    n_ex = 32

    def run_rdfa():
        for _ in range(n_ex):
            parts = dfa_k.value_decomposition(
                x, res, torch.tensor(1.3, device=device), ln_w, None, W_V, b_V, center=False
            )
            dfa_k.rdfa(parts, 0.5, w_head, 0)

    t_rdfa = median_time(run_rdfa, repeats, device)
    return {
        "shape": name,
        **s,
        "dfa_tokens_per_s": n / t_dfa,
        "dfa_pairs_per_s": len(b) / t_dfa,
        "encoder_tokens_per_s": n / t_enc,
        "dfa_over_encoder_time": t_dfa / t_enc,
        "rdfa_examples_per_s": n_ex / t_rdfa,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    results = [bench_shape(name, s, args.device, args.repeats) for name, s in SHAPES.items()]
    out = {
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": dt.date.today().isoformat(),
        "results": results,
    }
    path = Path(__file__).parent / "results" / f"dfa-{args.device}-{out['date']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(path)
    for r in results:
        print(
            f"{r['shape']:>20}: DFA {r['dfa_tokens_per_s']:,.0f} tokens/s ({r['l0']} features each; "
            f"{r['dfa_over_encoder_time']:.1f}x the encoder product's time), "
            f"RDFA {r['rdfa_examples_per_s']:,.0f} examples/s"
        )
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
