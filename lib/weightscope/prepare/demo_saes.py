"""Training the demo SAEs: one TopK SAE per block of stories260K, trained with sae-lens's own runner.

The SAEs the demo book reads are pinned in the repository (`data/demo_saes/<config>/`, read through
`weightscope.load.saes`), because a training reproduces its bytes on one machine only. This module trains:
`ensure_demo_saes()` returns the pinned folder when its manifest records this very training (parameters,
corpus, tokenizer and model: the same cache key) and trains only otherwise; its command line
(`make demo-saes`) retrains, compares the held-out quality with the pinned SAEs' and `--adopt` replaces them.

When it trains, `ensure_demo_saes()` returns the folder holding `layer_{L}/` (sae-lens save format:
`cfg.json`, `sae_weights.safetensors`, sae-lens's `sparsity.safetensors` and `runner_cfg.json`, plus our `metrics.json`)
and `manifest.json`, training only the layers that are missing: a rerun reuses the cache, a killed run resumes
at the first missing layer. Each layer is trained in a temporary folder and renamed into place, so a layer
folder is either complete or absent.

The cache folder is `cache_dir()/demo_saes/<name>-<key>/`, where the key hashes the training configuration,
the corpus files, the tokenizer and the model weights: changing any of them trains a fresh set.

Data. Both TinyStories files are used: `tinystories_cased.txt` (about 100k tokens; the model's tokenizer has
separate tokens for capitalised words) and the big lowercased file (about 2.1M tokens). The cased file is the
first stories of the lowercased one, cased, so story boundaries are read from the lowercased file (stories are
separated by a single newline there, paragraphs by a blank line) and carried over to the cased text. The last
5% of the stories of each file are held out for evaluation, and the lowercased copies of held-out cased
stories are left out of training. Every story is encoded as the model was trained (BOS, then run.c's
encoding), stories are concatenated and cut into rows of `context_size` tokens, and the rows are shuffled with
the seed.

Training. The model forward pass is the slow part on a CPU (TransformerLens's attention runs at about 10k
tokens/s here, the SAE step at 40-70k), so the residual stream at every hook is computed once, in one pass,
and written in sae-lens's cached-activations format (a `datasets` folder with one `Array2D` column per hook
and `token_ids`). Each layer is then trained by `LanguageModelSAETrainingRunner` with
`use_cached_activations=True`, cycling over the cached tokens for `training_tokens` (sae-lens's mixing buffer
shuffles them). BOS positions are excluded (`exclude_special_tokens`). The activation cache is deleted once
every layer is done.

Metrics (`metrics.json`, `manifest.json`) are computed by this module on held-out activations, BOS positions
excluded as in training: explained variance 1 - sum|x - x_hat|^2 / sum|x - mean x|^2, mean L0, the fraction of
features that never fire, and the MSE (mean over tokens of |x - x_hat|^2, sae-lens's convention).

Run `python -m weightscope.prepare.demo_saes` (add `--config tiny` for a seconds-long smoke run) to train from the
shell; `--config default --config attn` (`make demo-saes`) retrains both pinned sets and prints how they
compare.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weightscope.config.paths import REPO_ROOT, cache_dir, corpora_dir, models_dir
from weightscope.load import corpora
from weightscope.io import atomic_write_json, file_lock, file_sha256, versions
from weightscope.load import saes as load_saes
from weightscope.load.saes import (  # noqa: F401  (TARGET_BAR, read_manifest: importable from here too)
    CHECKED_FILES, LAYER_FILES, TARGET_BAR, demo_sae_pointer, layer_dir, layer_problem, meets_bar,
    read_manifest, sweep_path,
)

BOS_ID = 1  # llama2.c vocabularies: 0 <unk>, 1 <s> (BOS), 2 </s>
CASED_FILE, LOWER_FILE = corpora.STORIES_CASED, corpora.STORIES_LOWER
ACTS_DIR = "activations"  # cached training activations, deleted when every layer is done


class DemoSAEError(RuntimeError):
    """The demo SAEs cannot be trained or loaded; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class DemoSAEConfig:
    """How the demo SAEs are trained. Every field except `name` enters the cache key.

    `layers=None` trains one SAE per block of the model; the hook is `hook_template.format(layer=L)`.
    `train_rows` caps the distinct training rows whose activations are cached (None: all of them);
    `training_tokens` is what each SAE sees, cycling over them. `max_eval_tokens` caps the held-out tokens.
    """

    name: str = "default"
    model: str = "stories260K"
    layers: tuple[int, ...] | None = None
    hook_template: str = "blocks.{layer}.hook_resid_post"
    architecture: str = "topk"
    d_sae: int = 512
    k: int = 16
    aux_loss_coefficient: float = 1.0  # TopK auxiliary loss that revives dead features (Gao et al. 2024)
    context_size: int = 128
    train_rows: int | None = 3000
    training_tokens: int = 1_500_000
    train_batch_size_tokens: int = 4096
    store_batch_size_prompts: int = 32
    n_batches_in_buffer: int = 256  # sae-lens's mixing buffer holds n_batches_in_buffer * context_size tokens
    lr: float = 1e-3
    lr_warm_up_steps: int = 20
    lr_decay_fraction: float = 0.2  # linear decay to 0 over the last fifth of the steps
    dead_feature_window: int = 50  # steps without firing before the aux loss treats a feature as dead
    feature_sampling_window: int = 100
    exclude_bos: bool = True
    holdout_fraction: float = corpora.HOLDOUT_FRACTION
    seed: int = 0
    corpus_files: tuple[str, ...] = (CASED_FILE, LOWER_FILE)
    max_eval_tokens: int = 64_000

    def key_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("name")
        return d


DEFAULT = DemoSAEConfig()
TINY = DemoSAEConfig(
    name="tiny",
    d_sae=64,
    k=4,
    context_size=32,
    train_rows=64,
    training_tokens=4096,
    train_batch_size_tokens=256,
    store_batch_size_prompts=8,
    n_batches_in_buffer=16,
    lr_warm_up_steps=0,
    dead_feature_window=4,
    feature_sampling_window=8,
    max_eval_tokens=1024,
)
# Attention-output SAEs (chapter 4): one per block on hook_z, the heads' outputs before W_O, which sae-lens's
# activation store flattens to [n_heads * d_head] (64 for stories260K). 3M training tokens: with 1M, layers 2-4
# missed the bar (held-out explained variance 0.794 / 0.792 / 0.755); `--sweep attn` measures why (attn_sweep.json).
ATTN = dataclasses.replace(DEFAULT, name="attn", hook_template="blocks.{layer}.attn.hook_z", train_rows=2000,
                           training_tokens=3_000_000)
ATTN_TINY = dataclasses.replace(TINY, name="attn-tiny", hook_template="blocks.{layer}.attn.hook_z")
CONFIGS = {"default": DEFAULT, "tiny": TINY, "attn": ATTN, "attn-tiny": ATTN_TINY}
# What a config's quality depends on (`--sweep NAME`): variants of it, each trained at `layers` and measured on
# held-out text; {} is the config itself. The table goes to `data/demo_saes/<name>_sweep.json` (`sweep_path`).
SWEEPS = {
    "attn": {"layers": (2, 3, 4), "variants": {
        "1M tokens": dict(training_tokens=1_000_000),
        "1M tokens, k 32": dict(training_tokens=1_000_000, k=32),
        "1M tokens, 1,024 wide": dict(training_tokens=1_000_000, d_sae=1024),
        "3M tokens (pinned)": {},
        "3M tokens, 1,024 wide": dict(d_sae=1024),
        "3M tokens, 6,000 rows": dict(train_rows=6000),
    }},
}


# ------------------------------------------------------------------------------------------------------------
# Public entry points


def ensure_demo_saes(
    config: DemoSAEConfig | str = DEFAULT,
    *,
    progress: bool = True,
    model=None,
    encode: Callable[[str], list[int]] | None = None,
    use_pinned: bool = True,
) -> Path:
    """Folder with `layer_{L}/` sae-lens SAEs and `manifest.json`: the pinned ones when they fit, else trained
    ones.

    `config` is a `DemoSAEConfig` or a name in `CONFIGS` ("default", "attn", "tiny", ...). When the repository
    pins SAEs of this config (`data/demo_saes/<name>/`) trained with exactly these parameters, corpus,
    tokenizer and model, and `use_pinned`, those are returned (checksums verified) and nothing trains.
    Otherwise the missing layers are trained into the cache; a training with other parameters than the pinned
    ones is recorded in the config's pointer, so that `load_saes("demo")` reads it.
    `model` (a HookedTransformer) and `encode` (text -> token ids, BOS first) default to stories260K and its
    tokenizer; pass them to train on another model (never pinned). When every layer is cached it returns in
    about a second, without loading the model.
    """
    cfg = _resolve_config(config)
    say = _printer(progress)
    if use_pinned and model is None and encode is None:
        pinned = matching_pinned(cfg)
        if pinned is not None:
            say(f"demo SAEs: the pinned ones in {_shown(pinned)} "
                "(checksums verified; trained with these parameters), no training")
            return pinned
    # one process at a time trains or checks the shared cache; a second one waits (with a message)
    with file_lock(cache_dir() / "demo_saes" / ".lock", what="the demo-SAE cache", wait=True):
        return _ensure(cfg, say, progress, model, encode)


def matching_pinned(cfg: DemoSAEConfig) -> Path | None:
    """The pinned folder of `cfg.name` when it was trained as `cfg` would be (same cache key: parameters,
    corpus, tokenizer, model), checksums verified; else None. A pointer left by a training with other
    parameters is removed then, so that the pinned SAEs are read again."""
    pinned = load_saes.pinned_demo_folder(cfg.name)
    if pinned is None:
        return None
    try:
        key = _cache_key(cfg, _sources(cfg, None, None))
    except DemoSAEError:  # the model is not downloaded yet: compare the training parameters alone
        same = read_manifest(pinned).get("config") == json.loads(json.dumps(cfg.key_dict()))
        key = load_saes.pinned_cache_key(pinned) if same else None
    if key != load_saes.pinned_cache_key(pinned):
        return None
    load_saes.verify_pinned(pinned)
    pointer = demo_sae_pointer(cfg.name)
    if pointer.is_file() and load_saes.demo_sae_folder(cfg.name) != pinned:
        pointer.unlink(missing_ok=True)
    return pinned


def _ensure(cfg: DemoSAEConfig, say, progress: bool, model, encode) -> Path:
    sources = _sources(cfg, model, encode)
    root = cache_dir() / "demo_saes" / _cache_key(cfg, sources)
    wanted = _wanted_layers(cfg, model)
    _drop_damaged_layers(root, wanted, say)
    missing = [layer for layer in wanted if not _layer_complete(root, layer)]
    if not missing and _manifest_readable(root):
        say(f"demo SAEs: all {len(wanted)} layers cached in {root}")
        _point_to(cfg, root)
        return root
    model = model if model is not None else _load_model(cfg.model)
    encode = encode or _default_encoder(cfg.model)
    _check_config(cfg, model, wanted)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root)
    say(f"demo SAEs: layers {missing} to train -> {root}")
    data = build_datasets(cfg, encode, model.cfg.d_vocab)
    say(f"demo SAEs: {data['n_train_tokens']:,} distinct training tokens ({len(data['train'])} rows of "
        f"{cfg.context_size}), {data['n_eval_tokens']:,} held-out tokens")
    hooks = [cfg.hook_template.format(layer=layer) for layer in wanted]
    acts_dir, data["activation_cache_time_s"] = cache_activations(model, data["train_rows"], hooks,
                                                                  root / ACTS_DIR, say)
    eval_acts = held_out_activations(model, data["eval"], hooks, exclude_bos=cfg.exclude_bos)
    for layer in missing:
        hook = cfg.hook_template.format(layer=layer)
        _train_and_save_layer(cfg, model, data, acts_dir, eval_acts[hook], root, layer, say, progress)
        _write_manifest(cfg, root, wanted, sources, data)
    _write_manifest(cfg, root, wanted, sources, data)
    shutil.rmtree(root / ACTS_DIR, ignore_errors=True)  # every layer is done: the activations are not needed
    total = read_manifest(root)["total_training_time_s"]
    say(f"demo SAEs: done; training time of the {len(wanted)} layers {total:.0f} s")
    _point_to(cfg, root)
    return root


def _point_to(cfg: DemoSAEConfig, root: Path) -> None:
    """Record `root` as the folder of `cfg` that `load.saes.load_saes("demo")` reads, unless it is a training
    with the pinned SAEs' parameters: those are read from `data/demo_saes/` until adopted (`--adopt`)."""
    pinned = load_saes.pinned_demo_folder(cfg.name)
    if pinned is not None and load_saes.pinned_cache_key(pinned) == root.name:
        return
    atomic_write_json(demo_sae_pointer(cfg.name), {"config": cfg.name, "folder": str(root)})


def demo_sae_dir(config: DemoSAEConfig | str = DEFAULT, *, model=None, encode=None) -> Path:
    """Where `ensure_demo_saes(config)` keeps (or will keep) its SAEs; trains nothing."""
    cfg = _resolve_config(config)
    return cache_dir() / "demo_saes" / _cache_key(cfg, _sources(cfg, model, encode))


def _manifest_readable(root: Path) -> bool:
    try:
        return isinstance(read_manifest(root), dict)
    except (OSError, ValueError):
        return False


def _drop_damaged_layers(root: Path, wanted: list[int], say) -> None:
    """Remove damaged layer folders so that they are trained again (the others are kept)."""
    for layer in wanted:
        problem = layer_problem(root, layer)
        if problem:
            say(f"demo SAEs: {problem}; layer {layer} is trained again")
            shutil.rmtree(layer_dir(root, layer))


# ------------------------------------------------------------------------------------------------------------
# Configuration, sources and the cache key


def _resolve_config(config: DemoSAEConfig | str) -> DemoSAEConfig:
    if isinstance(config, DemoSAEConfig):
        return config
    if config in CONFIGS:
        return CONFIGS[config]
    names = sorted(CONFIGS)
    raise DemoSAEError(f"unknown demo-SAE config {config!r}; pass one of {names} or a DemoSAEConfig.")


def _printer(progress: bool) -> Callable[[str], None]:
    return (lambda msg: print(msg, flush=True)) if progress else (lambda msg: None)


def _corpus_paths(cfg: DemoSAEConfig) -> list[Path]:
    root = corpora_dir()
    if root is None:
        raise DemoSAEError(
            "WEIGHTSCOPE_CORPORA is not set: point it at the folder holding tinystories/ "
            "(the Makefile sets it to ../shared/corpora when that folder exists) and retry."
        )
    paths = [root / name for name in cfg.corpus_files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DemoSAEError(f"corpus file(s) missing: {missing}. Check WEIGHTSCOPE_CORPORA={root}.")
    return paths


def _model_folder(name: str) -> Path:
    """`WEIGHTSCOPE_MODELS/<name>`, else the download cache that `weightscope.load.models` fills."""
    candidates = ([models_dir() / name] if models_dir() is not None else []) + [cache_dir() / "models" / name]
    for folder in candidates:
        if (folder / f"{name}.bin").is_file():
            return folder
    raise DemoSAEError(
        f"cannot find the {name} checkpoint in {[str(c) for c in candidates]}: set WEIGHTSCOPE_MODELS to the "
        f"folder holding {name}/ (or load the model once with weightscope.load.models.load_model to download it), "
        "or pass `model=` and `encode=`."
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _model_fingerprint(model) -> str:
    """sha256 over the model's parameters and buffers (names, shapes, float32 bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


_PROBE = "Once upon a time, Lily's dog ran to the park.\n\nthe end. 42!"


def _sources(cfg: DemoSAEConfig, model, encode) -> dict[str, Any]:
    """What the SAEs are trained from: corpus files, tokenizer and model, each with a fingerprint."""
    paths = _corpus_paths(cfg)
    corpus = [{"name": n, "file": str(p), "sha256": _sha256(p)} for p, n in zip(paths, cfg.corpus_files)]
    if encode is None:
        tok = _model_folder(cfg.model) / "tok512.bin"
        tokenizer = {"file": str(tok), "sha256": _sha256(tok)}
    else:  # a custom encoder: fingerprint what it does to a probe string
        probe = hashlib.sha256(str(list(encode(_PROBE))).encode()).hexdigest()
        tokenizer = {"file": None, "probe_ids_sha256": probe}
    if model is None:
        ckpt = _model_folder(cfg.model) / f"{cfg.model}.bin"
        model_src = {"name": cfg.model, "file": str(ckpt), "sha256": _sha256(ckpt), "processing": {}}
    else:
        model_src = {"name": getattr(model.cfg, "model_name", None) or "custom", "file": None,
                     "state_sha256": _model_fingerprint(model), "processing": processing_flags(model)}
    return {"corpus": corpus, "tokenizer": tokenizer, "model": model_src}


def _cache_key(cfg: DemoSAEConfig, sources: dict[str, Any]) -> str:
    fingerprints = {
        "config": cfg.key_dict(),
        "corpus": [c["sha256"] for c in sources["corpus"]],
        "tokenizer": sources["tokenizer"].get("sha256") or sources["tokenizer"]["probe_ids_sha256"],
        "model": sources["model"].get("sha256") or sources["model"]["state_sha256"],
        "processing": sources["model"]["processing"],
    }
    blob = json.dumps(fingerprints, sort_keys=True, default=str).encode()
    return f"{cfg.name}-{hashlib.sha256(blob).hexdigest()[:12]}"


def processing_flags(model) -> dict[str, bool]:
    """TransformerLens processing flags the model was loaded with, only those switched on ({} = unprocessed).

    `weightscope.load.models.load_model` records them in `model.weightscope_processing`; sae-lens stores them in
    the SAE's `metadata.model_from_pretrained_kwargs` (and warns on load whenever they are non-empty).
    """
    return {k: v for k, v in (getattr(model, "weightscope_processing", None) or {}).items() if v}


def _layer_complete(root: Path, layer: int) -> bool:
    return all((layer_dir(root, layer) / f).is_file() for f in LAYER_FILES)


def _wanted_layers(cfg: DemoSAEConfig, model) -> list[int]:
    """Layers to train: `cfg.layers`, else every block of `model`, else of the named checkpoint's header."""
    if cfg.layers is not None:
        return list(cfg.layers)
    if model is not None:
        return list(range(model.cfg.n_layers))
    from weightscope.load.llama2c import read_checkpoint

    return list(range(read_checkpoint(_model_folder(cfg.model) / f"{cfg.model}.bin").config.n_layers))


def _load_model(name: str):
    try:
        from weightscope.load.models import load_model
    except ImportError as exc:
        raise DemoSAEError(
            "weightscope.load.models.load_model is not available, so the demo model cannot be loaded; "
            "pass `model=` (a HookedTransformer) and `encode=`."
        ) from exc
    return load_model(name)


def _default_encoder(name: str) -> Callable[[str], list[int]]:
    from weightscope.load.llama2c import load_encoder

    encoder = load_encoder(_model_folder(name) / "tok512.bin")
    return lambda text: encoder.encode(text, bos=True)


def _check_config(cfg: DemoSAEConfig, model, layers: list[int]) -> None:
    n_layers = model.cfg.n_layers
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise DemoSAEError(
            f"layers {bad} are out of range: the model has {n_layers} layers (0..{n_layers - 1}); "
            "fix `layers`."
        )
    if cfg.k > cfg.d_sae:
        raise DemoSAEError(f"k={cfg.k} must be at most d_sae={cfg.d_sae}.")
    if cfg.architecture != "topk":
        raise DemoSAEError(f"architecture {cfg.architecture!r} is not supported here; use 'topk'.")
    if cfg.context_size > model.cfg.n_ctx:
        raise DemoSAEError(
            f"context_size {cfg.context_size} exceeds the model's context ({model.cfg.n_ctx}); lower it."
        )


# ------------------------------------------------------------------------------------------------------------
# Data: stories -> token rows


def held_out_stories(config: DemoSAEConfig | str = DEFAULT) -> list[str]:
    """The stories no SAE of `config` is trained on (`load.corpora.held_out_stories` at its holdout fraction)."""
    return corpora.held_out_stories(_resolve_config(config).holdout_fraction)


def build_datasets(cfg: DemoSAEConfig, encode: Callable[[str], list[int]], d_vocab: int) -> dict[str, Any]:
    """Training and held-out token rows.

    Returns {"train_rows": int64 [n_train_rows, ctx], "train": `datasets.Dataset` with a `tokens` column (the
    same rows), "eval": LongTensor [n_eval_rows, ctx], "n_train_tokens", "n_eval_tokens", "n_train_stories",
    "n_eval_stories"}.
    """
    import datasets

    _corpus_paths(cfg)
    train_stories, eval_stories = corpora.story_split(cfg.holdout_fraction)
    rng = np.random.default_rng(cfg.seed)
    rng.shuffle(train_stories)  # spread the cased stories through the stream
    train = corpora.pack_rows(train_stories, encode, cfg.context_size)
    rng.shuffle(train)  # rows in random order: sae-lens reads its data sequentially
    train = train[: cfg.train_rows]
    held_out = corpora.pack_rows(eval_stories, encode, cfg.context_size)
    held_out = held_out[: max(1, cfg.max_eval_tokens // cfg.context_size)]
    if len(train) == 0 or len(held_out) == 0:
        raise DemoSAEError("the corpus is too small for one row of context_size tokens; lower context_size.")
    if max(int(train.max()), int(held_out.max())) >= d_vocab:
        raise DemoSAEError(f"token ids reach {int(train.max())}, outside the model's vocabulary ({d_vocab}): "
                           "the tokenizer does not belong to this model.")
    return {
        "train_rows": train,
        "train": datasets.Dataset.from_dict({"tokens": train}),
        "eval": torch.from_numpy(held_out),
        "n_train_tokens": int(train.size),
        "n_eval_tokens": int(held_out.size),
        "n_train_stories": len(train_stories),
        "n_eval_stories": len(eval_stories),
    }


# ------------------------------------------------------------------------------------------------------------
# Activations


@torch.no_grad()
def _forward_hooks(model, rows: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
    """Activations at `hooks` for token rows [batch, ctx]: {hook: float32 [batch, ctx, d]}, in one pass."""
    stop = max(_stop_at_layer(h) or model.cfg.n_layers for h in hooks)
    _, cache = model.run_with_cache(rows, names_filter=hooks, stop_at_layer=stop)
    # hook_z is [batch, ctx, n_heads, d_head]: flattened over heads, as sae-lens's activation store does
    return {h: cache[h].float().flatten(2) for h in hooks}


def hook_width(model, hook_name: str) -> int:
    """Width of the (flattened) activations at a hook: n_heads * d_head for `attn.hook_z`, else d_model."""
    return model.cfg.n_heads * model.cfg.d_head if hook_name.endswith("attn.hook_z") else model.cfg.d_model


def cache_activations(model, rows: np.ndarray, hooks: list[str], path: Path, say, batch_rows: int = 16,
                      shard_rows: int = 256) -> tuple[Path, float | None]:
    """Write the activations of `rows` at `hooks` in sae-lens's cached-activations format (reused if there).

    The folder is a `datasets` dataset with one `Array2D((ctx, d), float32)` column per hook and `token_ids`
    (int32, length ctx), as `sae_lens.CacheActivationsRunner` writes it; it is built in a temporary folder and
    renamed into place. Returns (path, seconds spent, or None when reused).
    """
    import datasets
    from datasets import Array2D, Features, Sequence, Value

    if (path / "dataset_info.json").is_file():
        say(f"demo SAEs: reusing cached activations in {path}")
        return path, None
    ctx = rows.shape[1]
    features = Features({**{h: Array2D(shape=(ctx, hook_width(model, h)), dtype="float32") for h in hooks},
                         "token_ids": Sequence(Value("int32"), length=ctx)})
    say(f"demo SAEs: caching activations of {rows.size:,} tokens at {len(hooks)} hooks (one forward pass)")
    start, shards = time.perf_counter(), []
    for s in range(0, len(rows), shard_rows):
        chunk = torch.from_numpy(rows[s : s + shard_rows])
        parts = [_forward_hooks(model, b, hooks) for b in chunk.split(batch_rows)]
        columns = {h: torch.cat([p[h] for p in parts]).numpy() for h in hooks}
        shards.append(datasets.Dataset.from_dict({**columns, "token_ids": chunk.numpy().astype(np.int32)},
                                                 features=features))
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{time.time_ns()}")
    with _quiet_datasets():
        datasets.concatenate_datasets(shards).save_to_disk(str(tmp))
    if path.exists():  # another process cached them meanwhile
        shutil.rmtree(tmp)
    else:
        os.rename(tmp, path)
    seconds = time.perf_counter() - start
    say(f"demo SAEs: cached in {seconds:.0f} s ({rows.size / seconds:,.0f} tokens/s through the model)")
    return path, seconds


def held_out_activations(model, rows: torch.Tensor, hooks: list[str], *, exclude_bos: bool,
                         batch_rows: int = 16) -> dict[str, torch.Tensor]:
    """{hook: float32 [n_tokens, d]} on held-out rows, BOS positions dropped when `exclude_bos`."""
    parts = [_forward_hooks(model, b, hooks) for b in rows.split(batch_rows)]
    keep = (rows.reshape(-1) != BOS_ID) if exclude_bos else torch.ones(rows.numel(), dtype=torch.bool)
    return {h: torch.cat([p[h] for p in parts]).reshape(rows.numel(), -1)[keep] for h in hooks}


def _stop_at_layer(hook_name: str) -> int | None:
    match = re.match(r"blocks\.(\d+)\.", hook_name)
    return int(match.group(1)) + 1 if match else None


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No `datasets` progress bars while saving the activation cache."""
    import datasets

    was_enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            datasets.utils.logging.enable_progress_bar()


# ------------------------------------------------------------------------------------------------------------
# Training one layer with sae-lens


def runner_config(cfg: DemoSAEConfig, hook_name: str, model, acts_dir: Path, output_path: Path | None):
    """The `LanguageModelSAERunnerConfig` of one layer: cached activations, W&B off, no checkpoints.

    sae-lens records `seed` but never seeds torch with it: the caller does.
    """
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig, TopKTrainingSAEConfig

    steps = cfg.training_tokens // cfg.train_batch_size_tokens
    sae_cfg = TopKTrainingSAEConfig(
        d_in=hook_width(model, hook_name),
        d_sae=cfg.d_sae,
        k=cfg.k,
        aux_loss_coefficient=cfg.aux_loss_coefficient,
        rescale_acts_by_decoder_norm=True,
        dtype="float32",
        device="cpu",
    )
    return LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        model_name=cfg.model,
        hook_name=hook_name,
        dataset_path="weightscope/tinystories-demo",  # a label only: the data come from the activation cache
        is_dataset_tokenized=True,
        streaming=False,
        use_cached_activations=True,
        cached_activations_path=str(acts_dir),
        context_size=cfg.context_size,
        prepend_bos=True,  # recorded in the SAE metadata; the rows carry BOS at each story start
        training_tokens=cfg.training_tokens,
        train_batch_size_tokens=cfg.train_batch_size_tokens,
        store_batch_size_prompts=cfg.store_batch_size_prompts,
        n_batches_in_buffer=cfg.n_batches_in_buffer,
        exclude_special_tokens=[BOS_ID] if cfg.exclude_bos else False,
        lr=cfg.lr,
        lr_scheduler_name="constant",
        lr_warm_up_steps=cfg.lr_warm_up_steps,
        lr_decay_steps=int(cfg.lr_decay_fraction * steps),
        dead_feature_window=cfg.dead_feature_window,
        feature_sampling_window=cfg.feature_sampling_window,
        device="cpu",
        seed=cfg.seed,
        dtype="float32",
        model_from_pretrained_kwargs=processing_flags(model),
        logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=0,
        checkpoint_path=None,
        output_path=str(output_path) if output_path is not None else None,
        verbose=False,
    )


@contextlib.contextmanager
def _training_guard(progress: bool) -> Iterator[None]:
    """Silence sae-lens's expected warnings (and, unless `progress`, its progress bar), restore the
    SIGINT/SIGTERM handlers that its runner replaces and never puts back, and turn the `InterruptedException`
    its handler raises on Ctrl-C back into a KeyboardInterrupt (what callers and the book runner expect)."""
    from sae_lens import logger as sae_lens_logger
    from sae_lens.training import sae_trainer
    from sae_lens.training._interruption import InterruptedException

    old_handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    old_level, old_tqdm = sae_lens_logger.level, sae_trainer.tqdm
    sae_lens_logger.setLevel("ERROR")  # "you passed a dataset/model which will override...": intended
    if not progress:
        sae_trainer.tqdm = _no_tqdm(old_tqdm)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*fewer samples.*")  # compares rows with tokens
            warnings.filterwarnings("ignore", message=".*beginning new epoch.*")  # we cycle on purpose
            warnings.filterwarnings("ignore", message=".*To copy construct from a tensor.*")
            yield
    except InterruptedException:
        raise KeyboardInterrupt from None
    finally:
        sae_lens_logger.setLevel(old_level)
        sae_trainer.tqdm = old_tqdm
        for s, handler in old_handlers.items():
            if handler is not None:
                signal.signal(s, handler)


def _no_tqdm(tqdm_cls):
    def make(*args, **kwargs):
        kwargs["disable"] = True
        return tqdm_cls(*args, **kwargs)

    return make


def train_layer(cfg: DemoSAEConfig, model, tokens_dataset, acts_dir: Path, layer: int, out_dir: Path,
                progress: bool = True) -> float:
    """Train one layer's SAE with `LanguageModelSAETrainingRunner`; save it (sae-lens format) to `out_dir`.

    Returns the training wall time in seconds.
    """
    from sae_lens import LanguageModelSAETrainingRunner

    run_cfg = runner_config(cfg, cfg.hook_template.format(layer=layer), model, acts_dir, out_dir)
    start = time.perf_counter()
    with _training_guard(progress), torch.random.fork_rng():
        torch.manual_seed(cfg.seed * 1000 + layer)  # SAE initialisation and the mixing buffer's shuffles
        # With cached activations the store reads the activation folder; the tokens dataset is only inspected,
        # but it must be given, or sae-lens would try `load_dataset(dataset_path)` from the hub.
        runner = LanguageModelSAETrainingRunner(
            run_cfg, override_dataset=tokens_dataset, override_model=model
        )
        runner.run()
    return time.perf_counter() - start


def _train_and_save_layer(cfg: DemoSAEConfig, model, data: dict[str, Any], acts_dir: Path,
                          eval_acts: torch.Tensor, root: Path, layer: int, say, progress: bool) -> None:
    tmp = root / f"layer_{layer}.tmp-{os.getpid()}-{time.time_ns()}"
    final = layer_dir(root, layer)
    hook = cfg.hook_template.format(layer=layer)
    say(f"demo SAEs: layer {layer} ({hook}): training on {cfg.training_tokens:,} tokens")
    try:
        seconds = train_layer(cfg, model, data["train"], acts_dir, layer, tmp, progress)
        metrics = evaluate_sae_dir(tmp, eval_acts)
        steps = -(-cfg.training_tokens // cfg.train_batch_size_tokens)  # sae-lens steps until it saw enough
        metrics.update(
            layer=layer,
            hook_name=hook,
            tokens_seen=steps * cfg.train_batch_size_tokens,
            training_time_s=round(seconds, 2),
            tokens_per_s=round(steps * cfg.train_batch_size_tokens / seconds),
        )
        metrics["meets_bar"] = meets_bar(metrics)
        metrics["sha256"] = {f: file_sha256(tmp / f) for f in CHECKED_FILES}  # checked whenever reused
        atomic_write_json(tmp / "metrics.json", metrics)
        if final.exists():  # another process finished this layer meanwhile: keep theirs
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"demo SAEs: layer {layer}: {seconds:.1f} s ({metrics['tokens_per_s']:,} tokens/s); held-out "
        f"EV {metrics['explained_variance']:.3f}, L0 {metrics['mean_l0']:.1f}, "
        f"dead {100 * metrics['dead_fraction']:.1f}%, MSE {metrics['mse']:.4g}")


def _remove_stale_temporaries(root: Path) -> None:
    """Delete temporary folders left by runs that were killed (their process is gone)."""
    for tmp in root.glob("*.tmp-*"):
        match = re.search(r"\.tmp-(\d+)-", tmp.name)
        if match and not _pid_alive(int(match.group(1))):
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # leftovers of an earlier, interrupted call in this very process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------------------------------------
# Held-out evaluation (our own code, on the saved inference SAE)


@torch.no_grad()
def evaluate_sae_dir(path: Path, acts: torch.Tensor, batch: int = 8192) -> dict[str, float]:
    """Held-out metrics of the sae-lens SAE saved at `path` on activations `acts` [n_tokens, d_in]."""
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(path), device="cpu")
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    sq_err = l0 = 0.0
    for x in acts.split(batch):
        feats = sae.encode(x)
        x_hat = sae.decode(feats)
        active = feats > 0
        fired += active.sum(0)
        sq_err += (x - x_hat).pow(2).sum().item()
        l0 += active.sum().item()
    n = acts.shape[0]
    total_var = (acts - acts.mean(0)).pow(2).sum().item()
    return {
        "n_eval_tokens": n,
        "explained_variance": 1.0 - sq_err / total_var,
        "mean_l0": l0 / n,
        "dead_fraction": (fired == 0).float().mean().item(),
        "mse": sq_err / n,
        "mean_sq_norm": acts.pow(2).sum(-1).mean().item(),
    }


# ------------------------------------------------------------------------------------------------------------
# Manifest


def _write_manifest(cfg: DemoSAEConfig, root: Path, wanted: list[int], sources: dict[str, Any],
                    data: dict[str, Any]) -> None:
    """Rebuild `manifest.json` from the complete layer folders (atomic write)."""
    cache_s = data.get("activation_cache_time_s")
    if cache_s is None and _manifest_readable(root):  # activations reused: keep the earlier time
        cache_s = read_manifest(root).get("activation_cache_time_s")
    per_layer = {str(layer): json.loads((layer_dir(root, layer) / "metrics.json").read_text())
                 for layer in wanted if _layer_complete(root, layer)}
    manifest = {
        "config_name": cfg.name,
        "cache_key": root.name,  # a training with the same parameters and sources gets this folder name
        "config": cfg.key_dict(),
        "architecture": cfg.architecture,
        "width": cfg.d_sae,
        "k": cfg.k,
        "context_size": cfg.context_size,
        "seed": cfg.seed,
        "tokens_seen_per_layer": cfg.training_tokens,
        "distinct_training_tokens": data["n_train_tokens"],
        "epochs_over_distinct_tokens": round(cfg.training_tokens / data["n_train_tokens"], 2),
        "hook_template": cfg.hook_template,
        "layers": wanted,
        "complete": len(per_layer) == len(wanted),
        "corpus": sources["corpus"],
        "corpus_note": (
            "tinystories_cased.txt keeps capitals (the model's tokenizer has distinct tokens for capitalised "
            "words); tinystories_lowercase.txt is lowercased, and its first stories are the cased file's "
            "stories. "
            "Both are used. The last 5% of the stories of each file are held out; the lowercased copies of "
            "held-out cased stories are left out of training."
        ),
        "n_train_stories": data["n_train_stories"],
        "n_eval_stories": data["n_eval_stories"],
        "n_eval_tokens": data["n_eval_tokens"],
        "bos_excluded": cfg.exclude_bos,
        "tokenizer": sources["tokenizer"],
        "model": sources["model"],
        "versions": versions(),
        "target_bar": TARGET_BAR,
        "metrics_note": "held-out text, BOS excluded; EV = 1 - sum|x-x_hat|^2 / sum|x-mean|^2; "
                        "MSE = mean over tokens of |x-x_hat|^2; dead = never fires on the held-out tokens",
        "per_layer": per_layer,
        "total_training_time_s": round(sum(m["training_time_s"] for m in per_layer.values()), 2),
        "activation_cache_time_s": round(cache_s, 2) if cache_s is not None else None,
        "all_meet_bar": bool(per_layer) and all(m["meets_bar"] for m in per_layer.values()),
    }
    atomic_write_json(root / "manifest.json", manifest)


# ------------------------------------------------------------------------------------------------------------
# Pinning: comparing a training with the shipped SAEs, and adopting it

PINNED_LAYER_FILES = (*LAYER_FILES, "sparsity.safetensors", "runner_cfg.json")  # sae-lens's folder, and ours
PATH_LABELS = (("cache", "$WEIGHTSCOPE_DATA/cache"), ("corpora", "$WEIGHTSCOPE_CORPORA"),
               ("models", "$WEIGHTSCOPE_MODELS"))


def compare_with_pinned(root: Path) -> list[str]:
    """Lines setting a training's held-out quality beside the pinned SAEs' of its config, layer by layer,
    with whether the weights are byte-identical. Empty when the repository pins no SAEs of that config."""
    new = read_manifest(root)
    pinned_dir = load_saes.pinned_demo_folder(new["config_name"])
    if pinned_dir is None:
        return []
    old = read_manifest(pinned_dir)
    lines = [f"compared with the pinned SAEs in {_shown(pinned_dir)} "
             "(held-out EV, L0, dead share, MSE: new / pinned):"]
    for layer, m in new["per_layer"].items():
        p = old["per_layer"].get(layer)
        if p is None:
            lines.append(f"  layer {layer}: not pinned")
            continue
        same = m["sha256"] == p["sha256"]
        lines.append(
            f"  layer {layer}: EV {m['explained_variance']:.3f} / {p['explained_variance']:.3f}  "
            f"L0 {m['mean_l0']:.1f} / {p['mean_l0']:.1f}  dead {100 * m['dead_fraction']:.1f}% / "
            f"{100 * p['dead_fraction']:.1f}%  MSE {m['mse']:.4g} / {p['mse']:.4g}  "
            + ("weights identical" if same else "weights differ"))
    return lines


def adopt(config: DemoSAEConfig | str = DEFAULT, root: Path | None = None) -> Path:
    """Replace the pinned SAEs `data/demo_saes/<name>/` with the complete training of `config` in the cache
    (or in `root`, a training folder of that config).

    Weights, `cfg.json` and `metrics.json` are copied byte for byte; in `manifest.json` and `runner_cfg.json`
    this machine's folders become `$WEIGHTSCOPE_DATA` / `$WEIGHTSCOPE_CORPORA` / `$WEIGHTSCOPE_MODELS`.
    `SHA256SUMS` is written last, and the new folder replaces the old one in one rename.
    """
    cfg = _resolve_config(config)
    root = Path(root) if root is not None else demo_sae_dir(cfg)
    if not _manifest_readable(root) or not read_manifest(root).get("complete"):
        raise DemoSAEError(f"no complete training of config {cfg.name!r} in {root}: train it first with "
                           f"`python -m weightscope.prepare.demo_saes --config {cfg.name}`.")
    final = load_saes.PINNED_DIR / cfg.name
    tmp = load_saes.PINNED_DIR / f".{cfg.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for layer in read_manifest(root)["layers"]:
        (tmp / f"layer_{layer}").mkdir(parents=True)
        for name in PINNED_LAYER_FILES:
            source = layer_dir(root, layer) / name
            if name == "runner_cfg.json":
                (tmp / f"layer_{layer}" / name).write_text(_without_local_paths(source.read_text()))
            elif source.is_file():
                shutil.copyfile(source, tmp / f"layer_{layer}" / name)
    manifest = read_manifest(root)
    manifest["cache_key"] = root.name
    (tmp / "manifest.json").write_text(_without_local_paths(json.dumps(manifest, indent=2, sort_keys=True)))
    load_saes.write_checksums(tmp)
    old = load_saes.PINNED_DIR / f".{cfg.name}.old-{os.getpid()}"
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def sweep(name: str, *, progress: bool = True, path: Path | None = None) -> Path:
    """Train every variant of `SWEEPS[name]` (cached trainings are reused) and write one row per variant and
    layer: held-out explained variance, L0, dead share, whether it meets `TARGET_BAR`, training tokens and
    time. Returns the JSON file (`sweep_path(name)` unless `path`)."""
    spec = SWEEPS[name]
    rows = []
    for label, changes in spec["variants"].items():
        cfg = dataclasses.replace(CONFIGS[name], name=f"{name}-sweep", layers=tuple(spec["layers"]), **changes)
        manifest = read_manifest(ensure_demo_saes(cfg, progress=progress, use_pinned=False))
        for layer, m in manifest["per_layer"].items():
            rows.append(dict(variant=label, layer=int(layer), d_sae=cfg.d_sae, k=cfg.k,
                             training_tokens=cfg.training_tokens, train_rows=cfg.train_rows,
                             explained_variance=m["explained_variance"], mean_l0=m["mean_l0"],
                             dead_fraction=m["dead_fraction"], meets_bar=bool(meets_bar(m)),
                             training_time_s=m["training_time_s"]))
    out = Path(path) if path is not None else sweep_path(name)
    atomic_write_json(out, {"config": name, "bar": TARGET_BAR, "n_eval_tokens": manifest["n_eval_tokens"],
                            "command": f"python -m weightscope.prepare.demo_saes --sweep {name}",
                            "rows": rows})
    return out


def _shown(path: Path) -> str:
    """`path` relative to the repository when it lies inside it."""
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _without_local_paths(text: str) -> str:
    """`text` with this machine's cache, corpora and models folders replaced by their variables' names."""
    roots = {"cache": cache_dir(), "corpora": corpora_dir(), "models": models_dir()}
    pairs = []
    for key, label in PATH_LABELS:
        if roots[key] is not None:
            pairs += [(str(Path(roots[key]).resolve()), label), (str(roots[key]), label)]
    for path, label in sorted(set(pairs), key=lambda p: -len(p[0])):
        text = text.replace(path, label)
    return text


# ------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    """Train (or reuse the cached training of) each config, print its quality beside the pinned SAEs' and the
    command that adopts it; with `--adopt`, replace the pinned SAEs with the cached training instead."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m weightscope.prepare.demo_saes",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", choices=sorted(CONFIGS),
                        help="config to train (repeatable; default: default)")
    parser.add_argument("--adopt", action="store_true",
                        help="replace the pinned SAEs data/demo_saes/<config>/ with the cached training")
    parser.add_argument("--sweep", choices=sorted(SWEEPS),
                        help="train the variants of a config (SWEEPS) and write data/demo_saes/<config>_sweep.json")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")  # belt and braces: the runner is configured without W&B
    if args.sweep:
        print(_shown(sweep(args.sweep, progress=not args.quiet)))
        return 0
    for name in args.config or ["default"]:
        try:
            code = _adopt_one(name) if args.adopt else _train_one(name, quiet=args.quiet)
        except (DemoSAEError, FileNotFoundError) as exc:  # FileNotFoundError: models.ModelUnavailableError
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("error: interrupted. Every finished layer is kept; rerun to train the others.",
                  file=sys.stderr)
            return 130
        if code:
            return code
    return 0


def _adopt_one(name: str) -> int:
    folder = adopt(name)
    print(f"adopted: {folder} now holds the training in {demo_sae_dir(name)}.")
    print("Next: `make demo-checksums` (the demo's result checksums), `make nbval-refresh` (the page "
          "references), then commit data/demo_saes/ and tests/nbval/ together.")
    return 0


def _train_one(name: str, quiet: bool) -> int:
    root = ensure_demo_saes(name, progress=not quiet, use_pinned=False)
    manifest = read_manifest(root)
    print(root)
    for layer, m in manifest["per_layer"].items():
        print(f"  layer {layer}: EV {m['explained_variance']:.3f}  L0 {m['mean_l0']:.1f}  "
              f"dead {100 * m['dead_fraction']:.1f}%  MSE {m['mse']:.4g}  {m['training_time_s']:.0f} s")
    if manifest.get("activation_cache_time_s") is not None:
        print(f"  activation cache (one forward pass): {manifest['activation_cache_time_s']:.0f} s")
    print(f"  total training time {manifest['total_training_time_s']:.0f} s; "
          f"bar {'reached' if manifest['all_meet_bar'] else 'NOT reached'} by every layer")
    comparison = compare_with_pinned(root)
    if comparison:
        print("\n".join(comparison))
        print(f"To ship this training instead of the pinned one: python -m weightscope.prepare.demo_saes "
              f"--config {name} --adopt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
