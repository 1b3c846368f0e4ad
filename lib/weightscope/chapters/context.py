"""The common opening of every chapter: parameters, device, model and SAEs for one target.

    ctx = open_chapter(target)                  # validated params, model name resolved, device, dtype
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
from typing import Any

import torch

from weightscope.config.params import PROCESSING_FLAGS, Target, load_target
from weightscope.io import versions

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
    """Everything a chapter needs to know about its target."""

    target: Target
    device: torch.device
    dtype: torch.dtype
    processing: dict[str, bool] | None = None  # processing flags applied to the weights (set on load)
    processing_notes: list[str] = field(default_factory=list)  # what each flag changed
    model_source: dict[str, Any] | None = None  # where the weights came from (set on load)

    def load_model_and_saes(self, *, mlp: bool = False):
        """The target's weights-only model, processed as its SAEs were trained, and its SAEs (lazily).

        mlp: also read the feed-forward weights (the FF-KV baseline of chapter 6); chapters 1–3 do not.

        Returns (model, saes): a `WeightsModel` on this chapter's device and dtype, and an `SAESequence` whose
        items are `LoadedSAE`s, each loaded when reached and checked to fit the model and read the residual
        stream (for local folders every SAE's config is checked here, before any work).
        """
        from weightscope.load.sae_sequence import SAESequence
        from weightscope.load.weights_model import apply_processing, load_weights_model

        model = load_weights_model(self.target.model_name, device=self.device, dtype=self.dtype,
                                   base=self._base(), mlp=mlp)
        layers = self.target.resolve_layers(model.cfg.n_layers)
        ids = self.target.sae_ids(layers) or [f"layer_{layer}" for layer in layers]
        saes = SAESequence(self.target.sae_source, ids, layers, device=str(self.device),
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
        from weightscope.load.models import load_full_model

        flags = self.processing if self.processing is not None else {}
        return load_full_model(self.target.model_name, device=self.device, dtype=self.dtype,
                               base=self._base(), **flags)

    def processing_flags(self, saes=None) -> dict[str, bool]:
        """Processing flags: explicit in the params, else those recorded with the target's SAEs."""
        if isinstance(self.target.processing, dict):
            return dict(self.target.processing)
        if self.target.sae_source == "demo":
            return {}  # the demo SAEs are trained on the unprocessed model
        if saes is None:
            raise ValueError("processing_flags needs the target's SAEs when `model.processing` is auto")
        recorded = saes.recorded_processing() or {}
        return {k: bool(v) for k, v in recorded.items() if k in PROCESSING_FLAGS}

    def _base(self):
        return self.target.path.parent if self.target.path is not None else None

    def provenance(self, **chapter_params: Any) -> dict[str, Any]:
        """What every result records: target and chapter parameters, the model's source and processing,
        device, dtype and versions."""
        return {
            "target": self.target.as_dict(),
            "chapter": chapter_params,
            "model_source": self.model_source,
            "processing": self.processing,
            "processing_notes": self.processing_notes,
            "device": str(self.device),
            "dtype": _dtype_name(self.dtype),
            "python": platform.python_version(),
            "versions": versions(),
        }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def sae_summary(sae) -> dict[str, Any]:
    """One row describing a loaded SAE (chapter 0's table)."""
    return {
        "layer": sae.layer, "hook": sae.hook_name, "source": sae.source, "id": sae.sae_id,
        "architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae, "k": sae.k,
        "trained on processing": sae.model_from_pretrained_kwargs,
    }


def open_chapter(target: str, *, seed: int = 0) -> ChapterContext:
    """Validate the target's parameters and model name, pick device and dtype, turn gradients off, seed."""
    from weightscope.load.sources import resolve_model

    params = load_target(target)
    resolve_model(params.model_name, base=params.path.parent if params.path else None)  # fails early, clearly
    device = resolve_device(params.device)
    torch.set_grad_enabled(False)
    torch.manual_seed(seed)
    return ChapterContext(target=params, device=device, dtype=resolve_dtype(params.dtype, device))


def check_target(target: str) -> None:
    """Everything about a target that can be checked without reading weights, raised as one clear error:
    the parameters, the model name (a local folder's config.json and architecture), and, for a local model
    with local SAE folders, every SAE's width, layer and hook against the model's config.json."""
    from weightscope.load.sae_sequence import SAESequence
    from weightscope.load.sources import resolve_model
    from weightscope.load.weights_model import shape_only

    params = load_target(target)
    source = resolve_model(params.model_name, base=params.path.parent if params.path else None)
    if source.kind != "local" or params.sae_source == "demo":
        return  # a hub model's config arrives with its download; demo SAEs are prepared by the book runner
    shape = shape_only(source.folder)
    layers = params.resolve_layers(shape.cfg.n_layers)
    ids = params.sae_ids(layers) or [f"layer_{layer}" for layer in layers]
    saes = SAESequence(params.sae_source, ids, layers, device="cpu", dtype=None, model=shape)
    if saes.metadata() is not None:
        saes.check()
