"""A target's SAEs as a sequence loaded one at a time, so that no chapter holds every SAE's weights at once.

    saes = SAESequence("gemma-scope-2b-pt-res-canonical", ids, layers, device="cuda", dtype="bfloat16")
    len(saes); saes.layers                 # metadata, no weights
    for sae in saes:                       # each a LoadedSAE, loaded (and checked) when reached
        ...

Iteration loads SAE i, yields it and drops the sequence's reference to it, so at most the SAE in use is held.
For a local folder, every SAE's `cfg.json` is read up front (`metadata()`, no weights), so an SAE that does
not fit the model is refused before any work.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from weightscope.config.paths import progress_enabled
from weightscope.load.saes import (LoadedSAE, SAEError, check_fits, demo_sae_folder, hook_layer, load_saes,
                                   require_attention_z, require_residual)

SITES = ("residual", "attention_z")


class SAESequence(Sequence):
    """SAEs `ids` of `source` (a release, a local folder, "demo" or "demo:<config>"), one per analysed layer
    in `layers`.

    model: when given, every SAE is checked to fit it (`check_fits`) and to read the `site` it is for:
    "residual" (the residual stream, `require_residual`) or "attention_z" (`blocks.L.attn.hook_z`,
    `require_attention_z`).
    """

    def __init__(self, source: str, ids: list[str], layers: list[int], *, device: str, dtype: str | None,
                 model=None, progress: bool = True, site: str = "residual"):
        if len(ids) != len(layers):
            raise ValueError(f"{len(ids)} SAE ids for {len(layers)} layers")
        if site not in SITES:
            raise ValueError(f"site {site!r}: use one of {SITES}")
        self.source, self.ids, self.layers, self.site = str(source), list(ids), list(layers), site
        self.device, self.dtype, self.model, self.progress = device, dtype, model, progress
        self._described: list[LoadedSAE] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> LoadedSAE:
        if isinstance(index, slice):
            raise TypeError("SAESequence loads one SAE at a time; index it with an integer")
        sae_id = self.ids[index]
        if self.progress and progress_enabled():
            print(f"[saes] {index % len(self) + 1}/{len(self)} [{sae_id}] loading from {self.source}",
                  file=sys.stderr, flush=True)  # "n/m [": dropped from pages like tqdm's bars, live only
        sae = load_saes(self.source, [sae_id], device=self.device, dtype=self.dtype)[0]
        if self.model is not None:
            self._require(sae)
        return sae

    def _require(self, sae: LoadedSAE) -> None:
        """Refuse an SAE (or its description) that does not fit the model or does not read this site."""
        check_fits(sae, self.model)
        if self.site == "residual":
            require_residual(sae)
        else:
            require_attention_z(sae, self.model.cfg)

    def __iter__(self):
        for index in range(len(self)):
            yield self[index]

    def metadata(self) -> list[LoadedSAE] | None:
        """Every SAE's description from its cfg.json (`LoadedSAE` with `sae=None`), for a local folder or the
        demo SAEs; None for a release (its configs are on the hub)."""
        folder = _folder_of(self.source)
        if folder is None:
            return None
        out = []
        for sae_id in self.ids:
            path = folder / sae_id / "cfg.json"
            if not path.is_file() and (folder / "cfg.json").is_file() and len(self.ids) == 1:
                path = folder / "cfg.json"
            out.append(_describe_cfg(path, self.source, sae_id))
        return out

    def describe(self) -> list[LoadedSAE]:
        """Every SAE's description without weights (`LoadedSAE` with `sae=None`: layer, hook, width): from
        cfg.json for a folder or the demo (`metadata`); for a release, each SAE loaded once in turn and its
        weights dropped. Computed once per sequence."""
        if self._described is None:
            self._described = self.metadata() or [dataclasses.replace(sae, sae=None) for sae in self]
        return self._described

    def subset(self, indices: list[int]) -> SAESequence:
        """The SAEs at `indices`, as a sequence like this one (lazy, same device, dtype and model check)."""
        out = SAESequence(self.source, [self.ids[i] for i in indices], [self.layers[i] for i in indices],
                          device=self.device, dtype=self.dtype, model=self.model, progress=self.progress,
                          site=self.site)
        if self._described is not None:
            out._described = [self._described[i] for i in indices]
        return out

    def check(self) -> None:
        """Refuse, before any weights are read, an SAE that does not fit the model or is not for the site."""
        for meta in self.metadata() or [self[0]]:
            self._require(meta)

    def recorded_processing(self) -> dict | None:
        """The TransformerLens processing the first SAE records (`model_from_pretrained_kwargs`)."""
        metas = self.metadata()
        first = metas[0] if metas else load_saes(self.source, [self.ids[0]], device="cpu")[0]
        return first.model_from_pretrained_kwargs

    def __repr__(self) -> str:
        return f"SAESequence({self.source!r}, layers={self.layers})"


def described(saes) -> list[LoadedSAE]:
    """Layer, hook and width of each SAE of `saes`: a lazy `SAESequence` (its descriptions, no weights read), a
    {layer: LoadedSAE} dict or a list of loaded SAEs."""
    if isinstance(saes, SAESequence):
        return saes.describe()
    return list(saes.values()) if isinstance(saes, dict) else list(saes)


def _folder_of(source: str) -> Path | None:
    if source == "demo" or source.startswith("demo:"):  # "demo:attn": the prepared config "attn"
        return demo_sae_folder(source.partition(":")[2] or "default")
    path = Path(source).expanduser()
    return path if path.is_dir() else None


def _describe_cfg(path: Path, source: str, sae_id: str) -> LoadedSAE:
    if not path.is_file():
        raise SAEError(f"SAE {sae_id!r} of {source}: no {path}. Each SAE folder needs cfg.json and "
                       "sae_weights.safetensors, as `sae.save_model(path)` writes them.")
    try:
        cfg = json.loads(path.read_text())
        meta = cfg.get("metadata") or {}
        hook = meta.get("hook_name") or cfg.get("hook_name")
        if not hook:
            raise SAEError(f"{path} records no hook name (`metadata.hook_name`); set it (e.g. "
                           "'blocks.3.hook_resid_post') and save the SAE again.")
        return LoadedSAE(
            sae=None, source=source, sae_id=sae_id, architecture=str(cfg.get("architecture", "?")),
            hook_name=hook, layer=hook_layer(hook) if hook else None, d_in=int(cfg["d_in"]),
            d_sae=int(cfg["d_sae"]), normalize_activations=cfg.get("normalize_activations", "none"),
            norm_scaling_factor=None, norm_scaling_folded=False, model_name=meta.get("model_name"),
            model_from_pretrained_kwargs=meta.get("model_from_pretrained_kwargs"),
            prepend_bos=meta.get("prepend_bos"), context_size=meta.get("context_size"), metadata=meta,
        )
    except (ValueError, KeyError, TypeError) as err:
        raise SAEError(f"{path} is not a sae-lens SAE config ({err!r}); save the SAE with `sae.save_model`.") \
            from err
