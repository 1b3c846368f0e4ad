"""The common opening of every chapter: parameters, device, model and SAEs for one target.

    ctx = open_chapter(target)                  # validated params, device, dtype; gradients off
    model, saes = ctx.load_model_and_saes()     # the model with its SAEs' processing; one checked SAE per layer
"""

from __future__ import annotations

import platform
import warnings
from dataclasses import dataclass
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
    processing: dict[str, bool] | None = None  # TransformerLens flags the model was loaded with (set on load)

    def load_model_and_saes(self):
        """The target's model (with the processing its SAEs were trained with) and one SAE per analysed layer.

        Returns (model, saes): a HookedTransformer on this chapter's device, and `LoadedSAE`s checked to fit it
        (d_model, hook, layer) and to read the residual stream.
        """
        from weightscope.load.models import load_model
        from weightscope.load.saes import check_fits, require_residual

        flags = self.processing_flags()
        self.processing = flags
        model = load_model(self.target.model_name, device=self.device, dtype=self.dtype, **flags)
        layers = self.target.resolve_layers(model.cfg.n_layers)
        saes = self._load_saes(layers)
        for sae in saes:
            check_fits(sae, model)
            require_residual(sae)
        return model, saes

    def processing_flags(self) -> dict[str, bool]:
        """TransformerLens processing flags: explicit in the params, else those recorded with the target's SAEs."""
        if isinstance(self.target.processing, dict):
            return dict(self.target.processing)
        if self.target.sae_source == "demo":
            return {}  # the demo SAEs are trained on the unprocessed model
        first = self._load_saes([0])[0]
        recorded = first.model_from_pretrained_kwargs or {}
        return {k: bool(v) for k, v in recorded.items() if k in PROCESSING_FLAGS}

    def _load_saes(self, layers: list[int]) -> list:
        from weightscope.load.saes import load_saes

        ids = self.target.sae_ids(layers) or [f"layer_{layer}" for layer in layers]
        return load_saes(self.target.sae_source, ids, device=str(self.device), dtype=_dtype_name(self.dtype))

    def provenance(self, **chapter_params: Any) -> dict[str, Any]:
        """What every result records: target parameters, chapter parameters, device, dtype and versions."""
        return {
            "target": self.target.as_dict(),
            "chapter": chapter_params,
            "processing": self.processing,
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
    """Validate the target's parameters, pick device and dtype, turn gradients off and seed torch."""
    params = load_target(target)
    device = resolve_device(params.device)
    torch.set_grad_enabled(False)
    torch.manual_seed(seed)
    return ChapterContext(target=params, device=device, dtype=resolve_dtype(params.dtype, device))
