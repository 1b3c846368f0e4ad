"""Pre-flight: every check that needs no model weights, run before any work, reporting every problem at once.

    resolved = resolve_target(load_target(params_file))  # parsed and model resolved, once
    problems = preflight(resolved, sources, defaults)    # [] when the run may start; else one line each
    skipped = skipped_chapters(resolved, sources)        # {chapter: why it does not apply}

What is checked, without loading weights or touching the network:
- the model name: `stories260K` (its checkpoint and tokenizer are read and sha256-checked, 1 MB), a local
  folder (it must hold `config.json` and weights), a TransformerLens name, or a hub id `org/name` (accepted;
  a failed download later names it);
- the model's depth and widths (`ModelDims`), from the llama2.c header, `config.json`, or the Hugging Face
  cache when it already holds the model's `config.json`; unknown dims skip the checks that need them;
- `device: cuda` on a machine without a CUDA GPU; layer indices out of range;
- the SAEs: a sae-lens release and its ids (offline directory), or a local folder (its `cfg.json`: d_in
  against d_model, the hook's layer against the depth); the demo SAEs once they are prepared;
- chapter overrides: names of chapters and parameters, types, and (for chapters registered in
  `weightscope.chapters.CHAPTERS` with a `Config`) the chapter's own checks, model-dependent ones included,
  and the files its `Config.inputs()` names (corpora, earlier chapters' tables);
- that the data and book folders can be written.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import weightscope.chapters as chapters
from weightscope.chapters.context import check_target
from weightscope.config.params import (NOTEBOOK_PARAMETERS, ParamsError, Target, check_chapter_names,
                                       check_overrides)
from weightscope.config.paths import cache_dir, data_dir, models_dir
from weightscope.load.checkpoints import CheckpointError
from weightscope.load.llama2c import (CHECKPOINT_FILE, DEMO_MODEL, KNOWN_SHA256, TOKENIZER_FILE,
                                      Llama2cFileError, read_checkpoint, read_tokenizer)
from weightscope.load.saes import SAEError, demo_sae_folder, hook_layer, is_residual_hook, validate_release
from weightscope.load.sources import ModelSource, resolve_model


class PreflightError(ParamsError):
    """The run cannot start; the message lists every problem found, one per line."""


@dataclass(frozen=True)
class ModelDims:
    """What the pre-flight knows of a model without loading it (None: not known before loading)."""

    n_layers: int | None = None
    d_model: int | None = None
    d_vocab: int | None = None
    n_heads: int | None = None
    n_ctx: int | None = None
    model_type: str | None = None  # config.json's model_type ("llama" for the demo)


@dataclass(frozen=True)
class ResolvedTarget:
    """A parsed parameters file with its model name resolved, once, for the pre-flight and the runner.

    source: where the model comes from (None when `model.name` names nothing; `problems` says why);
    dims: what is known of its shape without loading it (None when not known before loading).
    """

    params: Target
    source: ModelSource | None
    dims: ModelDims | None
    problems: tuple[str, ...] = ()


def resolve_target(params: Target) -> ResolvedTarget:
    """Resolve `params.model_name` (a relative folder from the parameters file's folder) and read its dims
    from small files only (no weights, no network)."""
    base = params.path.parent if params.path is not None else None
    try:
        source = resolve_model(params.model_name, base=base)
    except CheckpointError as err:  # unknown name, a folder that is not a model, an unsupported architecture
        return ResolvedTarget(params, None, None, (f"model.name: {err}",))
    dims, problems = source_dims(source)
    return ResolvedTarget(params, source, dims, tuple(problems))


def preflight(resolved: ResolvedTarget, sources: list[Path], defaults: dict[str, dict[str, Any]],
              *, extra: dict[str, Any] | None = None, book_dir: Path | None = None) -> list[str]:
    """Every problem that stops `resolved` from running the chapters `sources`, as one line each.

    `defaults`: {chapter stem: its declared parameters}, for every chapter of the book (not only those run).
    """
    target, dims = resolved.params, resolved.dims
    problems: list[str] = list(resolved.problems)
    problems += _device_problems(target.device)
    layers = _layer_problems(target, dims, problems)
    problems += sae_problems(target, dims, layers)
    if not problems:  # the loader's own checks: architecture supported, each local SAE against config.json
        problems += _loader_problems(resolved)
    problems += check_chapter_names(target, sorted(defaults))
    skipped = skipped_chapters(resolved, sources) if resolved.source is not None else {}
    for i, source in enumerate(sources):
        problems += chapter_problems(target, source.stem, defaults[source.stem],
                                     None if source.stem in skipped else dims, extra,
                                     earlier={s.stem for s in sources[:i]} - set(skipped),
                                     runs=source.stem not in skipped)
    for folder in (data_dir(), book_dir):
        if folder is not None:
            problems += _writable_problems(folder)
    return problems


# --- the model ---


def model_dims(name: str, *, base: Path | None = None) -> tuple[ModelDims | None, list[str]]:
    """(dims or None, problems) for a model name, reading only small files."""
    try:
        source = resolve_model(name, base=base)
    except CheckpointError as err:
        return None, [f"model.name: {err}"]
    return source_dims(source)


def source_dims(source: ModelSource) -> tuple[ModelDims | None, list[str]]:
    """(dims or None, problems) of a resolved model: the llama2.c header, config.json, or the Hugging Face
    cache's config.json when it already holds one."""
    if source.kind == "demo":
        return _stories260k_dims()
    if source.kind == "local":
        return _hf_dims(json.loads((source.folder / "config.json").read_text())), []
    return _cached_hub_dims(source.repo_id), []


def _stories260k_dims() -> tuple[ModelDims | None, list[str]]:
    candidates = ([models_dir() / DEMO_MODEL] if models_dir() else []) + [cache_dir() / "models" / DEMO_MODEL]
    folder = next((f for f in candidates if (f / CHECKPOINT_FILE).is_file()), None)
    if folder is None:
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            return None, [f"model.name: the {DEMO_MODEL} files are not on disk (looked in "
                          f"{', '.join(map(str, candidates))}) and HF_HUB_OFFLINE=1 forbids the download. "
                          f"Set WEIGHTSCOPE_MODELS to a folder holding {DEMO_MODEL}/."]
        return None, []  # downloaded (and sha256-checked) when the model is loaded
    try:
        cfg = read_checkpoint(folder / CHECKPOINT_FILE, expected_sha256=KNOWN_SHA256[CHECKPOINT_FILE]).config
        read_tokenizer(folder / TOKENIZER_FILE, vocab_size=cfg.vocab_size,
                       expected_sha256=KNOWN_SHA256[TOKENIZER_FILE])
    except Llama2cFileError as err:
        return None, [f"model.name: {err}"]
    return ModelDims(n_layers=cfg.n_layers, d_model=cfg.dim, d_vocab=cfg.vocab_size, n_heads=cfg.n_heads,
                     n_ctx=cfg.seq_len, model_type="llama"), []


def _cached_hub_dims(repo_id: str) -> ModelDims | None:
    """Dims from a `config.json` already in the Hugging Face cache (no network); None when not cached."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(path, str):
        return None
    try:
        return _hf_dims(json.loads(Path(path).read_text()))
    except ValueError:
        return None


def _hf_dims(cfg: dict[str, Any]) -> ModelDims:
    cfg = {**cfg, **(cfg.get("text_config") or {})}

    def first(*keys):
        return next((cfg[k] for k in keys if isinstance(cfg.get(k), int)), None)

    return ModelDims(n_layers=first("num_hidden_layers", "n_layer", "num_layers"),
                     d_model=first("hidden_size", "n_embd", "d_model"), d_vocab=first("vocab_size"),
                     n_heads=first("num_attention_heads", "n_head"),
                     n_ctx=first("max_position_embeddings", "n_positions", "n_ctx"),
                     model_type=cfg.get("model_type"))


def _loader_problems(resolved: ResolvedTarget) -> list[str]:
    """What `chapters.context.check_target` refuses (it reads config.json and cfg.json files, no weights)."""
    try:
        check_target(resolved.params, resolved.source)
    except ValueError as err:  # ParamsError, CheckpointError, SAEError: each says what to do
        return [str(err)]
    return []


def _device_problems(device: str) -> list[str]:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return ["device: the parameters ask for `cuda`, but no CUDA GPU is visible to torch. Set "
                "`device: auto` (falls back to the CPU) or `device: cpu`."]
    return []


def _layer_problems(target: Target, dims: ModelDims | None, problems: list[str]) -> list[int] | None:
    """The layers to analyse when known (explicit, or `all` with a known depth); appends range problems."""
    if dims is None or dims.n_layers is None:
        return None if target.layers == "all" else list(target.layers)
    try:
        return target.resolve_layers(dims.n_layers)
    except ParamsError as err:
        problems.append(str(err))
        return None


# --- the SAEs ---


def sae_problems(target: Target, dims: ModelDims | None, layers: list[int] | None) -> list[str]:
    """Problems with the target's SAEs, read from their configs only (no weights, no network)."""
    source = target.sae_source
    if source == "demo":
        try:
            folder = demo_sae_folder()
        except SAEError:
            return []  # not prepared yet: the prepare stage trains them for this model
    elif Path(source).expanduser().exists() or source.startswith((".", "/", "~")):
        folder = Path(source).expanduser()
    else:
        if layers is None:
            return []
        try:
            validate_release(source, target.sae_ids(layers))
        except SAEError as err:
            return [f"saes: {err}"]
        return []
    if not folder.is_dir():
        return [f"saes.source: SAE folder {folder} does not exist. Pass a folder saved by "
                f"`sae.save_model(path)`."]
    ids = target.sae_ids(layers) if layers is not None else None
    names = ids or ([f"layer_{layer}" for layer in layers] if layers is not None else None)
    if (folder / "cfg.json").is_file():
        names = ["."]
    if names is None:
        names = sorted(p.name for p in folder.iterdir() if (p / "cfg.json").is_file())
    return [p for name in names for p in _sae_config_problems(folder / name, dims)]


def _sae_config_problems(folder: Path, dims: ModelDims | None) -> list[str]:
    cfg_file = folder / "cfg.json"
    if not cfg_file.is_file():
        return [f"saes: {folder} holds no SAE (no cfg.json). Check `saes.source` and `saes.id_template`."]
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as err:
        return [f"saes: {cfg_file} is not valid JSON ({err}). Save the SAE again."]
    hook = cfg.get("hook_name") or (cfg.get("metadata") or {}).get("hook_name") or ""
    out = []
    if dims and dims.d_model and is_residual_hook(hook) and cfg.get("d_in") != dims.d_model:
        out.append(f"saes: the SAE in {folder} has d_in={cfg.get('d_in')}, but the model's residual stream "
                   f"has d_model={dims.d_model}: it was made for another model. Use SAEs made for this "
                   f"model.")
    layer = hook_layer(hook)
    if dims and dims.n_layers and layer is not None and not 0 <= layer < dims.n_layers:
        out.append(f"saes: the SAE in {folder} reads {hook}, but the model has {dims.n_layers} layers. "
                   f"Use SAEs made for this model.")
    return out


# --- chapter parameters ---


def chapter_problems(target: Target, stem: str, defaults: dict[str, Any], dims: ModelDims | None,
                     extra: dict[str, Any] | None = None, *, earlier: set[str] | None = None,
                     runs: bool = True) -> list[str]:
    """Problems with one chapter's overrides: names and types, then its registered `Config`'s own checks:
    `Config(**overrides)`, `Config.problems(dims)` (when `dims` is known and the chapter applies) and, where
    it `runs` (is not skipped), the files `Config.inputs()` names (`chapters.context.CorpusInput`,
    `TableInput`: each `problem(target, earlier)` is None when it is there; `earlier`: the chapters this run
    executes before this one)."""
    where = f"{target.path or target.target}: chapters.{stem}"
    overrides = {**target.chapter_params(stem), **(extra or {})}
    declared = {k: v for k, v in defaults.items() if k not in NOTEBOOK_PARAMETERS}
    try:
        merged = check_overrides(declared, overrides, where=where)
    except ParamsError as err:
        return [str(err)]
    config_cls = _registered_config(stem)
    if config_cls is None:
        return []
    fields = {f.name for f in dataclasses.fields(config_cls)}
    own = getattr(importlib.import_module(config_cls.__module__), "target_problems", None)  # e.g. attn_saes
    own = own(target, dims) if own else []
    try:
        config = config_cls(**{k: v for k, v in merged.items() if k in fields})
    except (ParamsError, TypeError, ValueError) as err:
        return [f"{where}: {line}" for line in str(err).splitlines() if line.strip()] + own
    checked = dims is not None and hasattr(config, "problems")
    out = [f"{where}: {p}" for p in config.problems(dims)] if checked else []
    inputs = config.inputs() if runs and hasattr(config, "inputs") else []
    found = [item.problem(target, earlier or set()) for item in inputs]
    found = list(dict.fromkeys(p for p in found if p))  # two files of one missing folder: one problem
    return out + [f"{where}: {p}" for p in found] + own


def skipped_chapters(resolved: ResolvedTarget, sources: list[Path]) -> dict[str, str]:
    """{chapter stem: why it does not apply to the target} for the chapters in `sources` that do not: by
    their own `skip_reason`, or because they read the tables of a chapter that does not (run or not)."""
    target, dims = resolved.params, resolved.dims
    reasons: dict[str, str | None] = {}

    def reason(stem: str) -> str | None:
        if stem not in reasons:
            skip_reason = getattr(chapter_module(stem), "skip_reason", None)
            reasons[stem] = skip_reason and skip_reason(target, dims)
            for producer in [] if reasons[stem] else _producers(stem):
                if why := reason(producer):
                    reasons[stem] = f"it reads the tables of {producer}, which does not apply: {why}"
                    break
        return reasons[stem]

    return {source.stem: reason(source.stem) for source in sources if reason(source.stem)}


def _producers(stem: str) -> list[str]:
    """The chapters whose tables `stem` reads (its default `Config`'s `TableInput`s)."""
    config_cls = _registered_config(stem)
    inputs = config_cls().inputs() if config_cls is not None and hasattr(config_cls, "inputs") else []
    return [item.produced_by for item in inputs if hasattr(item, "produced_by")]


def chapter_module(stem: str):
    """The module of a chapter registered in `weightscope.chapters.CHAPTERS` (or, until every chapter is
    registered there, in `SKIPPABLE`), imported; None for a chapter without one."""
    name = {**getattr(chapters, "SKIPPABLE", {}), **getattr(chapters, "CHAPTERS", {})}.get(stem)
    return importlib.import_module(name) if name else None


def _registered_config(stem: str):
    """The `Config` dataclass of a chapter registered in `weightscope.chapters.CHAPTERS`, or None."""
    if stem not in getattr(chapters, "CHAPTERS", {}):
        return None
    config_cls = getattr(chapter_module(stem), "Config", None)
    return config_cls if dataclasses.is_dataclass(config_cls) else None


# --- output folders ---


def _writable_problems(folder: Path) -> list[str]:
    """Whether files can be created under `folder` (made if missing): tried, not guessed from mode bits."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
            pass
    except OSError as err:
        return [f"output: cannot write in {folder} ({err.strerror or err}). Make it writable, or set "
                f"WEIGHTSCOPE_DATA to a writable folder."]
    return []
