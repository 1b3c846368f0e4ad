#!/usr/bin/env python
"""Chapter 4's write lens: the top content tokens of attention-SAE writes, at GPT-2 small's shape.

    .venv/bin/python bench/bench_write_lens.py [--device cpu|cuda] [--repeats 3] [--rows N]

`attention_saes.chunked_topk(writes, M, 6, keep=content)` (each feature's write [d_model] against the folded
unembedding [d_model x 50,257], restricted to the content tokens) is timed against the bare product
`writes @ M` and against the way it restricted the columns before: gathering the kept columns of each chunk's
scores (`scores[:, keep]`), then the top-k. The ratios carry over between machines; all three run in one
process, one after the other. On a CPU a subset of the 24,576 rows goes through (--rows, default 2,048).
Results go to bench/results/write-lens-<device>-<date>.json (written atomically).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))
sys.path.insert(0, str(REPO / "bench"))

from bench_ffkv import environment, pair, randn  # noqa: E402
from weightscope.chapters.attention_saes import chunked_topk  # noqa: E402
from weightscope.compute.streaming import CHUNK_ELEMENTS  # noqa: E402
from weightscope.io import atomic_write_json  # noqa: E402

GPT2 = {"d_model": 768, "d_vocab": 50257, "d_sae": 24576, "excluded": 256}  # byte-fallback-sized exclusion


def gathered_topk(rows: torch.Tensor, M: torch.Tensor, n: int, keep: torch.Tensor) -> torch.Tensor:
    """The former restriction: each chunk's kept columns gathered (a copy), then the top-k."""
    step = max(1, CHUNK_ELEMENTS // M.shape[1])
    return torch.cat([keep[(rows[i:i + step] @ M)[:, keep].topk(n, dim=-1).indices]
                      for i in range(0, len(rows), step)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=0, help="features through the lens (0: the device's default)")
    args = parser.parse_args(argv)
    device, s = args.device, GPT2
    torch.set_grad_enabled(False)
    n = args.rows or (s["d_sae"] if device == "cuda" else 2048)
    writes = randn(n, s["d_model"], device=device, seed=0)
    M = randn(s["d_model"], s["d_vocab"], device=device, seed=1)
    keep = torch.arange(s["excluded"], s["d_vocab"], device=device)
    same = torch.equal(chunked_topk(writes, M, 6, keep=keep)[1], gathered_topk(writes, M, 6, keep))
    print(f"same tokens as the gathered top-k: {same}", flush=True)
    results = [pair("masked", lambda: chunked_topk(writes, M, 6, keep=keep), lambda: writes @ M, device,
                    args.repeats, rows=n),
               pair("gathered", lambda: gathered_topk(writes, M, 6, keep), lambda: writes @ M, device,
                    args.repeats, rows=n)]
    out = REPO / "bench" / "results" / f"write-lens-{device}-{dt.date.today().isoformat()}.json"
    atomic_write_json(out, {"shape": s, "environment": environment(device), "repeats": args.repeats, "same_tokens": same,
                            "results": results})
    print(f"results: {out.relative_to(REPO)}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
