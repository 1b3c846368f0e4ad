#!/usr/bin/env python
"""The atlas's throughput: SAEs per minute on this machine with 1 and 2 Ray workers, at the demo width (512
features, d_model 64) and at GPT-2-small's width (24,576 features; random SAEs on the demo model, since
GPT-2's weights are not on this machine offline, so the products are 64-wide), and the time all Gemma Scope 2B
residual
SAEs would take from a measured matrix-product rate at Gemma-2-2B's shape.

    .venv/bin/python bench/bench_atlas.py [--max-features N] [--device cpu|cuda]

Writes bench/results/atlas-<device>-<date>.json. Each configuration is a fresh results folder (nothing cached)
on one local Ray session; the time per configuration includes each worker's model load, not Ray's start-up.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd
import torch

from weightscope.publish import atlas

RESULTS = Path(__file__).resolve().parent / "results"
GEMMA_2B = {"d_model": 2304, "d_vocab": 256000}


def tiny_saes(folder: Path, width: int, n: int) -> Path:
    """n random TopK SAEs of `width` features on the demo model, in sae-lens's folder format."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    for i in range(n):
        meta = SAEMetadata(hook_name=f"blocks.{i % 5}.hook_resid_post", model_name="stories260K",
                           model_from_pretrained_kwargs={})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sae = TopKSAE(TopKSAEConfig(d_in=64, d_sae=width, k=16, metadata=meta))
        with torch.no_grad():
            sae.W_dec.normal_(generator=torch.Generator().manual_seed(i))
        sae.save_model(folder / f"sae_{i}")
    return folder


def measure_flop_rate(device: str, rows: int = 256) -> float:
    """FLOP/s of the chapter-1 product (rows of W_dec against W_U) at Gemma-2-2B's shape."""
    D = torch.randn(rows, GEMMA_2B["d_model"], device=device)
    M = torch.randn(GEMMA_2B["d_model"], GEMMA_2B["d_vocab"], device=device)
    torch.mm(D, M)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        torch.mm(D, M)
    if device == "cuda":
        torch.cuda.synchronize()
    return 3 * 2 * rows * GEMMA_2B["d_model"] * GEMMA_2B["d_vocab"] / (time.perf_counter() - start)


def gemma_scope_estimate(flop_rate: float) -> dict:
    """Seconds for chapter 1's two products of every Gemma Scope 2B residual SAE at `flop_rate`."""
    from weightscope.load.saes import pretrained_directory

    d = pretrained_directory()
    ids = d["gemma-scope-2b-pt-res"].saes_map if "gemma-scope-2b-pt-res" in d else {}
    widths = [atlas._width_from_id(i) or 16384 for i in ids]
    flop = sum(2 * 2 * w * GEMMA_2B["d_model"] * GEMMA_2B["d_vocab"] for w in widths)
    return {"saes": len(widths), "flop": flop, "seconds": flop / flop_rate}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-features", type=int, default=0)
    ap.add_argument("--n-null", type=int, default=2048)
    ap.add_argument("--n-saes", type=int, default=4, help="random SAEs per width")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    c1 = atlas.ch1.Config(max_features=args.max_features, n_null=args.n_null)
    c2 = atlas.ch2.Config(max_features=args.max_features, n_null=args.n_null)
    os.environ["WEIGHTSCOPE_PROGRESS"] = "0"
    atlas.connect(None, 2)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, width in (("demo-width", 512), ("gpt2-small-width", 24576)):
            jobs = atlas.expand([{"folder": str(tiny_saes(Path(tmp) / name, width, args.n_saes)),
                                  "model": "stories260K"}])
            for workers in (1, 2):
                os.environ["WEIGHTSCOPE_ATLAS_DIR"] = str(Path(tmp) / f"out-{name}-{workers}")
                start = time.perf_counter()
                summary = atlas.run_atlas(jobs, c1=c1, c2=c2, workers=workers, device=args.device,
                                          log=lambda *_: None)
                seconds = time.perf_counter() - start
                status = summary["status"] if len(summary) else pd.Series(dtype=str)
                runs.append({"saes": name, "width": width, "workers": workers, "n": len(jobs),
                             "done": int((status == "done").sum()), "seconds": seconds,
                             "saes_per_minute": 60 * len(jobs) / seconds})
                print(json.dumps(runs[-1]), flush=True)
    rate = measure_flop_rate(args.device)
    report = {"date": dt.date.today().isoformat(), "device": args.device, "torch": torch.__version__,
              "max_features": args.max_features, "n_null": args.n_null, "cpus": os.cpu_count(), "runs": runs,
              "flop_per_s_gemma_shape": rate, "gemma_scope_2b_res": gemma_scope_estimate(rate),
              "command": " ".join(sys.argv)}
    print(json.dumps(report["gemma_scope_2b_res"]), f"at {rate / 1e9:.1f} GFLOP/s")
    out = RESULTS / f"atlas-{args.device}-{report['date']}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
