"""The common opening of every chapter: parameters, device, model and SAEs for one target.

    ctx = open_chapter(params_file)             # validated params (`ctx.params`), model resolved, device, dtype
    model, saes = ctx.load_model_and_saes()     # weights-only model (processed as the SAEs need); SAEs lazily
    full = ctx.load_full_model()                # chapters 0, 4-6: a HookedTransformer for forward passes

`model` is a `weightscope.load.weights_model.WeightsModel`: the tensors chapters 1–3 read, under
TransformerLens's names, read once by the streaming loader; `saes` an `SAESequence` that loads one SAE at a
time. The processing applied to the weights (the flags the SAEs were trained with) and the model's source are
recorded with every result through `provenance`.
"""

from __future__ import annotations

import platform
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightscope.config.params import PROCESSING_FLAGS, ParamsError, Target, load_target
from weightscope.io import folder_fingerprint, table_problem, versions
from weightscope.load.corpora import STORIES_CASED, STORIES_LOWER, CorpusError, corpus_path, held_out_windows
from weightscope.load.llama2c import BOS_ID, TOKENIZER_FILE, load_encoder, stories260k_dir
from weightscope.load.models import load_full_model
from weightscope.load.sae_sequence import SAESequence
from weightscope.load.sources import ModelSource, resolve_model
from weightscope.load.weights_model import apply_processing, load_weights_model, shape_only

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(requested: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU; an explicit `cuda` without a GPU is refused clearly."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "the parameters ask for device `cuda`, but no CUDA GPU is visible to torch. "
            "Set `device: auto` (falls back to the CPU) or `device: cpu` in the parameters file."
        )
    return torch.device(requested)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Half precision only pays on a GPU; on the CPU it is slower and less exact, so fall back to float32."""
    dtype = _DTYPES[name]
    if device.type == "cpu" and dtype != torch.float32:
        warnings.warn(f"dtype {name} requested on the CPU; using float32 instead (half precision is slow on CPUs).")
        return torch.float32
    return dtype


@dataclass
class ChapterContext:
    """Everything a chapter needs to know about its target: `params` is the parsed parameters file (its name
    is `params.target`), `source` where its model comes from."""

    params: Target
    device: torch.device
    dtype: torch.dtype
    processing: dict[str, bool] | None = None  # processing flags applied to the weights (set on load)
    processing_notes: list[str] = field(default_factory=list)  # what each flag changed
    model_source: dict[str, Any] | None = None  # where the weights came from (set on load)
    source: ModelSource | None = None  # `model.name` resolved (set by `open_chapter`)

    def load_model_and_saes(self, *, mlp: bool = False):
        """The target's weights-only model, processed as its SAEs were trained, and its SAEs (lazily).

        mlp: also read the feed-forward weights (the FF-KV baseline of chapter 6); chapters 1–3 do not.

        Returns (model, saes): a `WeightsModel` on this chapter's device and dtype, and an `SAESequence` whose
        items are `LoadedSAE`s, each loaded when reached and checked to fit the model and read the residual
        stream (for local folders every SAE's config is checked here, before any work).
        """
        model = load_weights_model(self.params.model_name, device=self.device, dtype=self.dtype,
                                   base=_params_dir(self.params), mlp=mlp)
        layers = self.params.resolve_layers(model.cfg.n_layers)
        ids = self.params.sae_names(layers)
        saes = SAESequence(self.params.sae_source, ids, layers, device=str(self.device),
                           dtype=_dtype_name(self.dtype), model=model)
        saes.check()
        self.processing = self.processing_flags(saes)
        apply_processing(model, self.processing)
        self.processing_notes = list(model.processing_notes)
        self.model_source = dict(model.source)
        return model, saes

    def load_full_model(self):
        """The `HookedTransformer` that runs forward passes (chapters 0, 4, 5, 6), processed as this
        context's flags say: TransformerLens's own for the demo and the models it knows, else built from the
        checkpoint's tensors (`weightscope.load.hooked`)."""
        if self.processing is None:
            self.processing = self.processing_flags()
        return load_full_model(self.params.model_name, device=self.device, dtype=self.dtype,
                               base=_params_dir(self.params), **self.processing)

    def held_out_rows(self, full, n_tokens: int, row_len: int) -> tuple[torch.Tensor, int | None]:
        """(LongTensor [rows, row_len] of about n_tokens held-out story tokens, BOS id): every story led by
        BOS, in the tokenizer the target's SAEs were evaluated with (for the demo, llama2c's own encoder,
        which splits some text differently from the Hugging Face-style tokenizer of `full`)."""
        if self.params.sae_source == "demo":
            encoder = load_encoder(stories260k_dir() / TOKENIZER_FILE)
            return held_out_windows(lambda s: encoder.encode(s, bos=True), n_tokens=n_tokens,
                                    row_len=row_len), BOS_ID
        encode = lambda s: full.to_tokens(s, prepend_bos=True)[0].tolist()  # noqa: E731
        return held_out_windows(encode, n_tokens=n_tokens, row_len=row_len), full.tokenizer.bos_token_id

    def processing_flags(self, saes=None) -> dict[str, bool]:
        """Processing flags: explicit in the params, else those recorded with the target's SAEs."""
        if isinstance(self.params.processing, dict):
            return dict(self.params.processing)
        if self.params.sae_source == "demo":
            return {}  # the demo SAEs are trained on the unprocessed model
        if saes is None:  # the first residual SAE's config records them (no weights read for a folder)
            layers = [0] if self.params.layers == "all" else list(self.params.layers)[:1]
            ids = self.params.sae_names(layers)
            saes = SAESequence(self.params.sae_source, ids, layers, device="cpu", dtype=None)
        recorded = saes.recorded_processing() or {}
        return {k: bool(v) for k, v in recorded.items() if k in PROCESSING_FLAGS}

    def provenance(self, **chapter_params: Any) -> dict[str, Any]:
        """What every result records: target and chapter parameters, the model's source and processing,
        device, dtype and versions."""
        return {
            "target": self.params.as_dict(),
            "chapter": chapter_params,
            "model_source": self.model_source,
            "input_files": input_files(self.params),
            "processing": self.processing,
            "processing_notes": self.processing_notes,
            "device": str(self.device),
            "dtype": _dtype_name(self.dtype),
            "python": platform.python_version(),
            "versions": versions(),
        }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- the inputs a chapter reads besides the model and its SAEs: `Config.inputs()` lists them, and the
# pre-flight calls each one's `problem(params, earlier)` (None: it is there; `earlier`: the chapters this
# run executes before this one). Another kind of input needs only such a `problem` method.


@dataclass(frozen=True)
class CorpusInput:
    """A text file the chapter reads from the corpora folder: `WEIGHTSCOPE_CORPORA/<name>`."""

    name: str  # e.g. "tinystories/tinystories_cased.txt"

    def problem(self, params: Target, earlier: set[str]) -> str | None:
        try:
            corpus_path(self.name)
        except CorpusError as err:
            return str(err)
        return None


# the files `load.corpora.held_out_windows` reads: a chapter that measures on held-out text returns these
# from `Config.inputs()`
HELD_OUT_TEXT = (CorpusInput(STORIES_LOWER), CorpusInput(STORIES_CASED))


@dataclass(frozen=True)
class TableInput:
    """A result table an earlier chapter writes (`io.require_table`)."""

    name: str  # e.g. "01_features"
    produced_by: str  # the notebook stem that writes it, e.g. "01_output_tokens"

    def problem(self, params: Target, earlier: set[str]) -> str | None:
        """None when the producing chapter runs earlier in this run, or its table is stored and verifies."""
        if self.produced_by in earlier:
            return None
        found = table_problem(params.target, self.name)
        return found and (f"{found}; run the chapter {self.produced_by} first (make book "
                          f"TARGET={params.target} runs every chapter in order)")


def sae_metadata(target: Target, dims) -> list | None:
    """The target's SAEs' metadata (`layer`, `hook_name`), read from their cfg.json for a local folder or the
    demo, for the chapters' skip rules; None where it is not read here (a hub release is not downloaded by the
    pre-flight; bad layers and missing SAEs are the pre-flight's own problems)."""
    from weightscope.load.saes import SAEError  # as `input_files`: sae-lens is imported only when needed

    if getattr(dims, "n_layers", None) is None:
        return None
    try:
        layers = target.resolve_layers(dims.n_layers)
        return SAESequence(target.sae_source, target.sae_names(layers), layers, device="cpu",
                           dtype=None).metadata()
    except (ParamsError, SAEError):
        return None


def sae_summary(sae) -> dict[str, Any]:
    """One row describing a loaded SAE (chapter 0's table)."""
    return {
        "layer": sae.layer, "hook": sae.hook_name, "source": sae.source, "id": sae.sae_id,
        "architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae, "k": sae.k,
        "trained on processing": sae.model_from_pretrained_kwargs,
    }


def open_chapter(params_file: str, *, seed: int = 0) -> ChapterContext:
    """Parse the parameters file (a name in params/ or a path) and resolve its model name, once; pick device
    and dtype, turn gradients off, seed."""
    params = load_target(params_file)
    source = resolve_model(params.model_name, base=_params_dir(params))  # fails early, clearly
    device = resolve_device(params.device)
    torch.set_grad_enabled(False)
    torch.manual_seed(seed)
    return ChapterContext(params=params, device=device, dtype=resolve_dtype(params.dtype, device),
                          source=source)


def check_target(params: Target, source: ModelSource) -> None:
    """Everything about a parsed target that can be checked without reading weights, raised as one clear
    error: for a local model with local SAE folders, every SAE's width, layer and hook against the model's
    config.json. `source` is `params.model_name` resolved (the pre-flight resolves it once)."""
    if source.kind != "local" or params.sae_source == "demo":
        return  # a hub model's config arrives with its download; demo SAEs are prepared by the book runner
    shape = shape_only(source.folder)
    layers = params.resolve_layers(shape.cfg.n_layers)
    ids = params.sae_names(layers)
    saes = SAESequence(params.sae_source, ids, layers, device="cpu", dtype=None, model=shape)
    if saes.metadata() is not None:
        saes.check()


def input_files(params: Target) -> dict[str, str | None]:
    """{model, saes, attn_saes: `io.folder_fingerprint` of the local folder the target names, None for a hub
    source}: results and executed pages depend on the files, not only on the folder's name."""
    from weightscope.load.saes import SAEError, demo_sae_folder

    def folder(source: str | None) -> Path | None:
        if source is None:
            return None
        if source.split(":")[0] == "demo":
            try:
                return demo_sae_folder(source.partition(":")[2] or "default")
            except SAEError:
                return None  # not prepared yet: the prepare stage comes first
        path = Path(source).expanduser()
        base = _params_dir(params)
        return next((p for p in ([base / path] if base is not None else []) + [path] if p.is_dir()), None)

    return {"model": folder_fingerprint(folder(params.model_name)),
            "saes": folder_fingerprint(folder(params.sae_source)),
            "attn_saes": folder_fingerprint(folder((params.attn_saes or {}).get("source")))}


def _params_dir(params: Target):
    """Where a relative model folder in the parameters file is looked up first."""
    return params.path.parent if params.path is not None else None
