"""The common opening of every chapter: parameters, device, model and SAEs for one target.

    ctx = open_chapter(target)                # validated params, device, dtype; gradients off
    model = ctx.load_model()                  # HookedTransformer with the processing the SAEs need
    saes = ctx.load_saes(model)               # one residual SAE per analysed layer, checked against the model
"""

from __future__ import annotations

import platform
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from weightscope.params import Target, load_target
from weightscope.results import versions

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

    def load_model(self):
        """The target's model (see `weightscope.models.load_model`), on this chapter's device."""
        from weightscope.models import load_model

        return load_model(self.target.model_name, device=self.device, **self.processing_flags())

    def processing_flags(self) -> dict[str, bool]:
        """TransformerLens processing flags for the model: explicit in the params, else those the SAEs record."""
        if isinstance(self.target.processing, dict):
            return dict(self.target.processing)
        from weightscope.saes import recorded_processing

        return recorded_processing(self.target.sae_source, self._first_sae_id())

    def _first_sae_id(self) -> str | None:
        ids = self.target.sae_ids([0])
        return ids[0] if ids else None

    def load_saes(self, model) -> list:
        """One SAE per analysed layer, checked to fit `model` (d_model, hook, layer)."""
        from weightscope.saes import load_target_saes

        layers = self.target.resolve_layers(model.cfg.n_layers)
        return load_target_saes(self.target, layers, model=model, device=self.device)

    def provenance(self, **chapter_params: Any) -> dict[str, Any]:
        """What every result records: target parameters, chapter parameters, device, dtype and versions."""
        return {
            "target": self.target.as_dict(),
            "chapter": chapter_params,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "python": platform.python_version(),
            "versions": versions(),
        }


def open_chapter(target: str, *, seed: int = 0) -> ChapterContext:
    """Validate the target's parameters, pick device and dtype, turn gradients off and seed torch."""
    params = load_target(target)
    device = resolve_device(params.device)
    torch.set_grad_enabled(False)
    torch.manual_seed(seed)
    return ChapterContext(target=params, device=device, dtype=resolve_dtype(params.dtype, device))
