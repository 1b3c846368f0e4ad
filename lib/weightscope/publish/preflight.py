"""Pre-flight: every check that needs no model weights, run before any work, reporting every problem at once.

    problems = preflight(target, sources)   # [] when the run may start; else one line per problem

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
  `weightscope.chapters.CHAPTERS` with a `Config`) the chapter's own checks, model-dependent ones included;
- that the data and book folders can be written.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightscope.config.params import ParamsError, Target, check_chapter_names, check_overrides
from weightscope.config.paths import cache_dir, data_dir, models_dir

WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "model*.safetensors.index.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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


def preflight(target: Target, sources: list[Path], defaults: dict[str, dict[str, Any]],
              *, extra: dict[str, Any] | None = None, book_dir: Path | None = None) -> list[str]:
    """Every problem that stops `target` from running the chapters `sources`, as one line each.

    `defaults`: {chapter stem: its declared parameters}, for every chapter of the book (not only those run).
    """
    problems: list[str] = []
    dims, model_problems = model_dims(target.model_name)
    problems += model_problems
    problems += _device_problems(target.device)
    layers = _layer_problems(target, dims, problems)
    problems += sae_problems(target, dims, layers)
    if not problems:  # the loader's own checks: architecture supported, each local SAE against config.json
        problems += _loader_problems(target)
    problems += check_chapter_names(target, sorted(defaults))
    for source in sources:
        problems += chapter_problems(target, source.stem, defaults[source.stem], dims, extra)
    for folder in (data_dir(), book_dir):
        if folder is not None:
            problems += _writable_problems(folder)
    return problems


# --- the model ---


def model_dims(name: str) -> tuple[ModelDims | None, list[str]]:
    """(dims or None, problems) for a model name, reading only small files."""
    if name.lower() == "stories260k":
        return _stories260k_dims()
    folder = Path(name).expanduser()
    if folder.exists() or name.startswith((".", "/", "~")):
        return _folder_dims(folder)
    from weightscope.load.models import transformer_lens_name

    try:
        official = transformer_lens_name(name)
    except ValueError as err:
        if _HUB_ID.match(name):  # not a TransformerLens name, but shaped like a hub id: checked when loading
            return _cached_hub_dims(name), []
        return None, [f"model.name: {err}"]
    return _cached_hub_dims(official), []


def _stories260k_dims() -> tuple[ModelDims | None, list[str]]:
    from weightscope.load.llama2c import KNOWN_SHA256, Llama2cFileError, read_checkpoint, read_tokenizer
    from weightscope.load.models import CHECKPOINT_FILE, DEMO_MODEL, TOKENIZER_FILE

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


def _folder_dims(folder: Path) -> tuple[ModelDims | None, list[str]]:
    config = folder / "config.json"
    if not folder.is_dir() or not config.is_file():
        return None, [f"model.name: {folder} is not a model folder (it must hold config.json and the "
                      f"weights). Check the path, or name a TransformerLens model such as 'gpt2-small'."]
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHT_FILES):
        return None, [f"model.name: {folder} holds config.json but no weights ({', '.join(WEIGHT_FILES)}). "
                      f"Save the model with `model.save_pretrained(folder)`."]
    from weightscope.load.checkpoints import UnsupportedArchitectureError, detect_arch

    try:
        raw = json.loads(config.read_text())
    except ValueError as err:
        return None, [f"model.name: {config} is not valid JSON ({err}). Save the model again."]
    try:
        detect_arch(raw)
    except UnsupportedArchitectureError as err:
        return None, [f"model.name: {err}"]
    return _hf_dims(raw), []


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


def _loader_problems(target: Target) -> list[str]:
    """What `chapters.context.check_target` refuses (it reads config.json and cfg.json files, no weights)."""
    from weightscope.chapters.context import check_target

    try:
        check_target(str(target.path) if target.path else target.target)
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
    from weightscope.load.saes import SAEError, demo_sae_folder, validate_release

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
    from weightscope.load.saes import hook_layer, is_residual_hook

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
                     extra: dict[str, Any] | None = None) -> list[str]:
    """Problems with one chapter's overrides: names and types, then its registered `Config`'s own checks."""
    where = f"{target.path or target.target}: chapters.{stem}"
    overrides = {**target.chapter_params(stem), **(extra or {})}
    declared = {k: v for k, v in defaults.items() if k != "target"}
    try:
        merged = check_overrides(declared, overrides, where=where)
    except ParamsError as err:
        return [str(err)]
    config_cls = _registered_config(stem)
    if config_cls is None:
        return []
    fields = {f.name for f in dataclasses.fields(config_cls)}
    try:
        config = config_cls(**{k: v for k, v in merged.items() if k in fields})
    except (ParamsError, TypeError, ValueError) as err:
        return [f"{where}: {line}" for line in str(err).splitlines() if line.strip()]
    if hasattr(config, "problems"):  # unknown dims are None; checks of other inputs (corpora) still run
        return [f"{where}: {p}" for p in config.problems(dims or ModelDims())]
    return []


def skipped_chapters(target: Target, sources: list[Path]) -> dict[str, str]:
    """{chapter stem: why it does not apply to `target`} for the chapters in `sources` that do not."""
    import weightscope.chapters as chapters

    dims, _ = model_dims(target.model_name)
    out = {}
    for source in sources:
        module = chapters.SKIPPABLE.get(source.stem)
        reason = module and importlib.import_module(module).skip_reason(target, dims)
        if reason:
            out[source.stem] = reason
    return out


def _registered_config(stem: str):
    """The `Config` dataclass of a chapter registered in `weightscope.chapters.CHAPTERS`, or None."""
    import weightscope.chapters as chapters

    module_name = getattr(chapters, "CHAPTERS", {}).get(stem)
    if module_name is None:
        return None
    config_cls = getattr(importlib.import_module(module_name), "Config", None)
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
