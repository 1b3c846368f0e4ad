"""The streaming loader `checkpoints.load_weights(..., mlp=False)` against transformers'
`AutoModelForCausalLM.from_pretrained` on a random bf16 checkpoint of Gemma-2-2B width and reduced depth
(--depth), each load in a fresh subprocess: time and peak memory against the bytes of the tensors the
chapters need. Left out of --quick runs."""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import harness

NAME = "loading"
ORDER = 5
QUICK = False
GEMMA_2B = {  # Gemma2Config of google/gemma-2-2b (num_hidden_layers is 26 there; --depth here)
    "vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216, "num_attention_heads": 8,
    "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 4096,
    "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "tie_word_embeddings": True,
}
# Fresh-process loads per case (--load-repeats overrides); blocks in the checkpoint come from --depth.
PLANS = {(device, quick): {"repeats": 3} for device in ("cpu", "cuda") for quick in (False, True)}
# (loader, dtype, fold_embed_scale); the unfolded case keeps W_U a view of W_E (one embedding, not two)
CASES = [("load_weights", "bfloat16", True), ("load_weights", "bfloat16", False),
         ("load_weights", "float32", True), ("from_pretrained", "bfloat16", None),
         ("from_pretrained", "float32", None)]


def worker_write_checkpoint(spec: dict) -> dict:
    """A random bf16 Gemma-2-2B-width checkpoint of `depth` blocks: shard 1 the embedding, 2 the rest."""
    import safetensors.torch
    import torch
    import transformers

    folder = Path(spec["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    cfg = transformers.Gemma2Config(**GEMMA_2B, num_hidden_layers=spec["depth"],
                                    architectures=["Gemma2ForCausalLM"])
    cfg.dtype = torch.bfloat16
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in transformers.Gemma2ForCausalLM(cfg).state_dict().items()}
    shapes.pop("lm_head.weight")  # tied: Gemma checkpoints store only the embedding
    embed = "model.embed_tokens.weight"
    shards = {"model-00001-of-00002.safetensors": [embed],
              "model-00002-of-00002.safetensors": [k for k in shapes if k != embed]}
    weight_map, total = {}, 0
    for i, (shard, names) in enumerate(shards.items()):
        tensors = {}
        for j, name in enumerate(names):
            scale = 0.1 if name.endswith("norm.weight") else 0.02
            tensors[name] = harness.randn(shapes[name], seed=1000 * i + j, device="cpu", scale=scale,
                                          dtype=torch.bfloat16)
            weight_map[name] = shard
            total += tensors[name].nbytes
        safetensors.torch.save_file(tensors, folder / shard, metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    cfg.save_pretrained(folder)
    return {"total_bytes": total, "files": sorted(p.name for p in folder.iterdir())}


def needed_bytes(config: dict, dtype_bytes: int, *, fold_embed_scale: bool = True) -> int:
    """Bytes of the tensors `load_weights(mlp=False)` returns for a Gemma-2 config, in a dtype this size."""
    d, V, L = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]
    nh, nkv, dh = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    per_layer = d + d * dh * (2 * nh + 2 * nkv)
    embed = V * d * (2 if fold_embed_scale else 1)  # W_E scaled, W_U the raw embedding
    return dtype_bytes * (embed + d + L * per_layer)


def worker_load(spec: dict) -> dict:
    import safetensors  # noqa: F401  imported before the baseline, like torch
    import torch

    device, folder = spec["device"], spec["folder"]
    dtype = getattr(torch, spec["dtype"])
    if spec["loader"] == "load_weights":
        from weightscope.load.checkpoints import load_weights

        with harness.PeakMemory(device) as peak:
            start = time.perf_counter()
            ws = load_weights(folder, dtype=dtype, device=device, mlp=False,
                              fold_embed_scale=spec.get("fold_embed_scale", True))
            harness.sync(device)
            seconds = time.perf_counter() - start
        held = ws.nbytes()
        info = {"n_tensors": len(ws.tensors()), "held_bytes": held}
    else:
        import transformers

        with harness.PeakMemory(device) as peak:
            start = time.perf_counter()
            try:
                model, loading = transformers.AutoModelForCausalLM.from_pretrained(
                    folder, dtype=dtype, device_map=device if device == "cuda" else None,
                    output_loading_info=True)
            except (ImportError, ValueError):  # device_map may need accelerate: load on CPU, then move
                model, loading = transformers.AutoModelForCausalLM.from_pretrained(
                    folder, dtype=dtype, output_loading_info=True)
                model.to(device)
            harness.sync(device)
            seconds_returned = time.perf_counter() - start
            # transformers may hand back tensors backed by the file's memory map, read only when first used:
            # read every parameter once (aminmax: one pass, no temporaries) so that the weights are in memory
            for param in model.parameters():
                torch.aminmax(param.detach())
            harness.sync(device)
            seconds = time.perf_counter() - start
        held = sum(p.numel() * p.element_size() for p in model.parameters())
        info = {"held_bytes": held, "seconds_returned": seconds_returned,
                "missing_keys": len(loading["missing_keys"]),
                "unexpected_keys": len(loading["unexpected_keys"])}
    return {**peak.result, "seconds": seconds, **info}


WORKERS = {"write_checkpoint": worker_write_checkpoint, "load": worker_load}


def run(ctx: harness.Context) -> dict:
    depth, device, meta = ctx.options.get("depth", 4), ctx.device, ctx.meta
    repeats = ctx.options.get("load_repeats") or ctx.plan["repeats"]
    harness.log(f"loading: writing a {depth}-layer gemma-2-2b-width bf16 checkpoint under {ctx.tmp}")
    folder = ctx.tmp / f"gemma-2-2b-width-{depth}-layers"
    module = sys.modules[__name__]
    written = harness.run_worker(module, "write_checkpoint", {"folder": str(folder), "depth": depth})
    config = json.loads((folder / "config.json").read_text())
    key, cases = harness.peak_key(device), CASES

    def label(loader, dtype, fold):
        return f"{loader}[{dtype}{', fold_embed_scale=False' if fold is False else ''}]"

    samples: dict[str, list] = {label(*case): [] for case in cases}
    for _ in range(repeats):  # interleaved, so that drifts in machine load hit every case alike
        for loader, dtype, fold in cases:
            spec = {"device": device, "folder": str(folder), "loader": loader, "dtype": dtype,
                    "fold_embed_scale": fold}
            samples[label(loader, dtype, fold)].append(harness.run_worker(module, "load", spec))
    shutil.rmtree(folder)
    out = {}
    for (loader, dtype, fold), (name, runs) in zip(cases, samples.items()):
        # the same tensors as each loader holds them: from_pretrained keeps the tied embedding once
        needed = needed_bytes(config, 2 if dtype == "bfloat16" else 4, fold_embed_scale=bool(fold))
        peaks = [r[key] for r in runs]
        out[name] = {
            "loader": loader, "dtype": dtype, "fold_embed_scale": fold, "repeats": len(runs),
            "median_s": statistics.median(r["seconds"] for r in runs),
            "samples_s": [r["seconds"] for r in runs],
            "median_s_returned": statistics.median(r.get("seconds_returned", r["seconds"]) for r in runs),
            "peak_delta_bytes_median": statistics.median(peaks), "peak_delta_bytes_max": max(peaks),
            "needed_bytes": needed, "held_bytes": runs[0]["held_bytes"],
            "ratio_peak_over_needed": statistics.median(peaks) / needed, "runs": runs,
        }
    lw, hf = out["load_weights[bfloat16]"], out["from_pretrained[bfloat16]"]
    lw32, hf32 = out["load_weights[float32]"], out["from_pretrained[float32]"]
    result = {
        **meta, "benchmark": "loading", "shape": f"gemma-2-2b width, {depth} layers", "depth": depth,
        "checkpoint_bytes": written["total_bytes"], "checkpoint_files": written["files"], "measure": key,
        "needed_definition": "bytes, in the load dtype, of the tensors load_weights(mlp=False) returns: "
                             "the embedding (twice when fold_embed_scale: W_E scaled by sqrt(d_model) as "
                             "TransformerLens stores it, and W_U the raw embedding; once otherwise, and for "
                             "from_pretrained, which ties them), ln_final, and per layer ln1 and "
                             "W_Q/W_K/W_V/W_O",
        "page_cache": "warm: the checkpoint was just written and read by every case",
        "cases": out,
        "ratio_time_from_pretrained_over_load_weights_bf16": hf["median_s"] / lw["median_s"],
        "ratio_peak_from_pretrained_over_load_weights_bf16": (hf["peak_delta_bytes_median"]
                                                              / lw["peak_delta_bytes_median"]),
        "ratio_time_from_pretrained_over_load_weights_fp32": hf32["median_s"] / lw32["median_s"],
        "ratio_peak_from_pretrained_over_load_weights_fp32": (hf32["peak_delta_bytes_median"]
                                                              / lw32["peak_delta_bytes_median"]),
        "from_pretrained_note": "from_pretrained loads the whole model (MLP included); its time and peak are "
                                "taken after reading every parameter once (transformers may return tensors "
                                "backed by the file's memory map, which count in RSS only once read); "
                                "median_s_returned is the time until from_pretrained returned",
    }
    for label, case in result["cases"].items():
        harness.log(f"  {label}: {case['median_s']:.2f} s, peak/needed {case['ratio_peak_over_needed']:.2f}")
    return result


def table(r: dict, report: dict) -> str:
    lines = [f"Checkpoint: {r['shape']}, {harness.gb(r['checkpoint_bytes'])} of bf16 tensors.\n",
             "| loader | dtype | time | peak RSS above baseline | tensors held | tensors needed "
             "| peak / needed |",
             "|---|---|---|---|---|---|---|"]
    for case in r["cases"].values():
        unfolded = case.get("fold_embed_scale") is False
        loader = case["loader"] + (" (fold_embed_scale=False)" if unfolded else "")
        lines.append(f"| {loader} | {case['dtype']} | {case['median_s']:.2f} s "
                     f"| {harness.gb(case['peak_delta_bytes_median'])} | {harness.gb(case['held_bytes'])} "
                     f"| {harness.gb(case['needed_bytes'])} | {case['ratio_peak_over_needed']:.2f} |")
    return "\n".join(lines) + "\n"
