"""Peak host memory and load time: the weights-only route against `HookedTransformer.from_pretrained`.

    python bench/bench_loading.py                    # 2-layer Gemma-2 stand-in at real widths (3 GB, fp32)
    python bench/bench_loading.py --layers 1 --quick # smaller, for a smoke run

A random Gemma-2 checkpoint with Gemma-2-2B's widths (d_model 2,304, 8 heads, 4 kv heads of 256, d_mlp 9,216,
256,000 tokens) but `--layers` blocks is written in Hugging Face format, then each route loads it in a fresh
process, which reports its peak resident set (VmHWM), its resident set before loading, and the load time:

* `weights_only`: `weightscope.load.weights_model.load_weights_model(folder)`: what chapters 1-3 hold.
* `hooked`: `weightscope.load.hooked.hooked_from_folder(folder)`, unprocessed: the forward-pass model of
  chapters 0 and 4-7.
* `transformer_lens`: `HookedTransformer.from_pretrained_no_processing("gemma-2-2b", hf_model=...)` after
  `AutoModelForCausalLM.from_pretrained(folder)`, TransformerLens's official Gemma-2-2B config cut to the
  stand-in's depth (it cannot read the folder's config itself).

Extrapolation (written with the results): each route's peak above its baseline is measured as a multiple r of
the bytes it must hold: the chapters' tensors for the weights-only route (W_E, W_U and per block the
attention weights and norm), every parameter for TransformerLens. Peak(real model) = baseline + r x bytes(real
model). Results go to bench/results/loading-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_TOKENIZER = REPO.parent / "shared" / "tokenizers" / "gpt2"
GEMMA_2_2B = dict(hidden_size=2304, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                  intermediate_size=9216, vocab_size=256000)
REAL = {  # depth and widths of the models the appendix extrapolates to (from their config.json files)
    "Gemma-2-2B": dict(n_layers=26, d_model=2304, n_heads=8, n_kv=4, d_head=256, d_mlp=9216, vocab=256000,
                       two_embeddings=True, gated=True, n_norms=4),
    "Gemma-2-9B": dict(n_layers=42, d_model=3584, n_heads=16, n_kv=8, d_head=256, d_mlp=14336, vocab=256000,
                       two_embeddings=True, gated=True, n_norms=4),
    "Llama-3.1-8B": dict(n_layers=32, d_model=4096, n_heads=32, n_kv=8, d_head=128, d_mlp=14336, vocab=128256,
                         two_embeddings=True, gated=True, n_norms=2),
}


def needed_bytes(m: dict, itemsize: int = 4) -> int:
    """Bytes the chapters hold: W_E and W_U (two tensors: Gemma's scaled W_E, Llama's untied W_U), final norm,
    and per block the pre-attention norm, W_Q, W_K, W_V (kv heads), W_O."""
    d, attn = m["d_model"], m["d_model"] * m["d_head"] * (2 * m["n_heads"] + 2 * m["n_kv"])
    embed = m["vocab"] * d * (2 if m["two_embeddings"] else 1)
    return itemsize * (embed + d + m["n_layers"] * (attn + d))


def all_bytes(m: dict, itemsize: int = 4) -> int:
    """Bytes of every parameter (as TransformerLens holds them: a second copy of the embedding as W_U)."""
    d = m["d_model"]
    mlp = d * m["d_mlp"] * (3 if m["gated"] else 2)
    attn = d * m["d_head"] * (2 * m["n_heads"] + 2 * m["n_kv"])
    return itemsize * (2 * m["vocab"] * d + d + m["n_layers"] * (attn + mlp + m["n_norms"] * d))


def _rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    lines = Path("/proc/self/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return (int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024)


# ----------------------------------------------------------------------------------------------------------
# Child processes


def build(folder: Path, n_layers: int, vocab: int) -> None:
    """Write a random Gemma-2 checkpoint (fp32, one safetensors file per block plus the embedding)."""
    import torch
    import transformers
    from safetensors.torch import save_file

    cfg = transformers.Gemma2Config(**{**GEMMA_2_2B, "vocab_size": vocab}, num_hidden_layers=n_layers,
                                    architectures=["Gemma2ForCausalLM"])
    cfg.save_pretrained(folder)
    transformers.GPT2TokenizerFast(vocab=str(SHARED_TOKENIZER / "vocab.json"),
                                   merges=str(SHARED_TOKENIZER / "merges.txt")).save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    d, nh, nkv, dh, dm = 2304, 8, 4, 256, 9216
    index = {}

    def save(tensors: dict, name: str) -> None:
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        index.update(dict.fromkeys(tensors, name))

    save({"model.embed_tokens.weight": torch.randn(vocab, d, generator=g) * 0.02,
          "model.norm.weight": torch.randn(d, generator=g) * 0.1}, "model-embed.safetensors")
    for layer in range(n_layers):
        p = f"model.layers.{layer}."
        shapes = {"self_attn.q_proj.weight": (nh * dh, d), "self_attn.k_proj.weight": (nkv * dh, d),
                  "self_attn.v_proj.weight": (nkv * dh, d), "self_attn.o_proj.weight": (d, nh * dh),
                  "mlp.gate_proj.weight": (dm, d), "mlp.up_proj.weight": (dm, d),
                  "mlp.down_proj.weight": (d, dm)}
        tensors = {p + k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            tensors[f"{p}{norm}.weight"] = torch.randn(d, generator=g) * 0.1
        save(tensors, f"model-layer{layer:02d}.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))


def load(route: str, folder: Path) -> dict:
    """Load `folder` by `route` in this (fresh) process; returns the measurements."""
    import torch

    import transformers  # both routes import it before their baseline (the tokenizer is transformers')

    if route == "weights_only":
        from weightscope.load.weights_model import load_weights_model

        base, _ = _rss()
        t = time.perf_counter()
        model = load_weights_model(str(folder), progress=False)
        seconds = time.perf_counter() - t
        held = model.nbytes()
    elif route == "hooked":
        from weightscope.load.hooked import hooked_from_folder

        base, _ = _rss()
        t = time.perf_counter()
        model = hooked_from_folder(folder)
        seconds = time.perf_counter() - t
        held = sum(p.numel() * p.element_size() for p in model.parameters())
    else:
        import transformer_lens.loading_from_pretrained as tl_loading
        from transformer_lens import HookedTransformer

        n_layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
        vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
        official = tl_loading.convert_hf_model_config

        def cut(name, **kwargs):  # TransformerLens's Gemma-2-2B config at the stand-in's depth
            cfg = official(name, **kwargs)
            return {**cfg, "n_layers": n_layers, "attn_types": cfg["attn_types"][:n_layers], "d_vocab": vocab}

        tl_loading.convert_hf_model_config = cut
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        base, _ = _rss()
        t = time.perf_counter()
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        model = HookedTransformer.from_pretrained_no_processing(
            "gemma-2-2b", hf_model=hf, tokenizer=tokenizer, dtype=torch.float32, device="cpu")
        del hf
        seconds = time.perf_counter() - t
        held = sum(p.numel() * p.element_size() for p in model.parameters())
    rss, peak = _rss()
    return {"route": route, "load_s": round(seconds, 2), "baseline_rss": base, "peak_rss": peak,
            "rss_after": rss, "held_bytes": held}


# ----------------------------------------------------------------------------------------------------------
# Orchestration


def _child(*args: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "lib")}
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256000, help="stand-in's vocabulary (real: 256,000)")
    parser.add_argument("--quick", action="store_true", help="vocab 32,000: a smoke run, not for the book")
    parser.add_argument("--routes", nargs="*", default=["weights_only", "hooked", "transformer_lens"])
    parser.add_argument("--child", nargs=2, metavar=("ROUTE_OR_BUILD", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.child:
        what, folder = args.child[0], Path(args.child[1])
        if what == "build":
            build(folder, args.layers, args.vocab)
            print(json.dumps({"built": str(folder)}))
        else:
            print(json.dumps(load(what, folder)))
        return 0

    vocab = 32000 if args.quick else args.vocab
    standin = dict(REAL["Gemma-2-2B"], n_layers=args.layers, vocab=vocab)
    with tempfile.TemporaryDirectory(prefix="weightscope-bench-") as tmp:
        folder = Path(tmp) / "gemma2-standin"
        print(f"[bench] writing a {args.layers}-layer Gemma-2 stand-in at real widths (vocab {vocab:,}) ...",
              flush=True)
        _child("--layers", str(args.layers), "--vocab", str(vocab), "--child", "build", str(folder))
        runs = {}
        for route in args.routes:
            print(f"[bench] {route} ...", flush=True)
            runs[route] = _child("--child", route, str(folder))
            r = runs[route]
            print(f"[bench] {route}: {r['load_s']} s, peak RSS {r['peak_rss'] / 2**30:.2f} GiB "
                  f"(baseline {r['baseline_rss'] / 2**30:.2f} GiB)", flush=True)
    result = {"date": date.today().isoformat(), "standin": standin, "routes": runs,
              "needed_bytes_standin": needed_bytes(standin), "all_bytes_standin": all_bytes(standin),
              "extrapolated": {}}
    for route, r in runs.items():
        size = needed_bytes if route == "weights_only" else all_bytes
        ratio = (r["peak_rss"] - r["baseline_rss"]) / size(standin)
        r["ratio_peak_over_bytes"] = round(ratio, 3)
        for name, model in REAL.items():
            peak = r["baseline_rss"] + ratio * size(model)
            result["extrapolated"].setdefault(name, {})[route] = {
                "bytes": size(model), "peak_rss_gib": round(peak / 2**30, 1)}
    if "weights_only" in runs:
        w = runs["weights_only"]
        above = w["peak_rss"] - w["baseline_rss"]
        result["weights_only_peak_over_needed"] = round(above / needed_bytes(standin), 3)
    name = f"loading-{date.today().isoformat()}{'-quick' if args.quick else ''}.json"
    out = args.out or REPO / "bench" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=2))
    tmp_out.replace(out)  # atomic: never a half-written result
    print(f"[bench] wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    print(json.dumps(result["extrapolated"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
