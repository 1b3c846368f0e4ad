"""Loading SAEs (sae-lens releases, local sae-lens folders, the demo SAEs) and checking that they fit a model.

`load_saes(source, sae_ids)` returns one `LoadedSAE` per SAE: the sae-lens object plus the fields the book
reads (weights in sae-lens's orientation, hook, layer, widths, normalisation and the model processing it was
trained with). Release names and ids are checked against sae-lens's bundled directory of pretrained SAEs
*before* any download, and a mistake is refused with the close matches.

Conventions:

- `W_enc` is [d_in, d_sae] and `W_dec` is [d_sae, d_in] (sae-lens's orientation): feature i reads the residual
  stream along `W_enc[:, i]` and writes `W_dec[i]`.
- Reading layers: an SAE on `blocks.{L}.hook_resid_pre` sees the stream that block L reads, so blocks L, L+1,
  ... read its features; on `blocks.{L}.hook_resid_mid`, the MLP of block L and blocks L+1, ...; on
  `blocks.{L}.hook_resid_post`, blocks L+1, ... (and, after the last block, only the unembedding).

The demo SAEs are shipped with the repository in `data/demo_saes/<config>/` ("default": the residual stream,
"attn": the attention outputs), in sae-lens's folder format, with `SHA256SUMS` (every file, `sha256sum -c`
format) and `manifest.json` (how they were trained and their quality on held-out text). `load_saes("demo")`
reads them after checking every checksum; it never trains. A training with other parameters
(`weightscope.prepare.demo_saes`) is used instead only when the prepare stage recorded it in
`data/cache/demo_saes/<config>.json`. This module also reads the manifests and holds the quality bar.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightscope.config import paths
from weightscope.io import atomic_write_json, file_sha256

RESIDUAL_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")
_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")
SAE_FILES = ("cfg.json", "sae_weights.safetensors")


class SAEError(ValueError):
    """An SAE cannot be loaded or does not fit; the message says what was wrong and what to do."""


@dataclass(eq=False)
class LoadedSAE:
    """One SAE, with the fields the book reads. Weight fields are views of the sae-lens parameters (no copy).

    - `sae`: the sae-lens `SAE` object (use it to encode/decode).
    - `source`, `sae_id`: the release name (or folder) and id it was loaded from.
    - `architecture`: sae-lens architecture name ("topk", "jumprelu", "standard", "gated", ...).
    - `hook_name`: TransformerLens hook the SAE reads, e.g. "blocks.3.hook_resid_post".
    - `layer`: L parsed from `blocks.{L}.` in the hook name; None for hooks outside the blocks (`hook_embed`).
    - `d_in`, `d_sae`: input width and number of features.
    - `normalize_activations`: sae-lens's input normalisation still applied at run time ("none" once folded).
    - `norm_scaling_factor`: the dataset-norm scaling factor the release publishes (Llama Scope), already
      folded into the weights by sae-lens when `norm_scaling_folded`; else None.
    - `model_name`: the model the SAE was trained on, as recorded.
    - `model_from_pretrained_kwargs`: the TransformerLens processing the SAE was trained with (e.g.
      {"center_writing_weights": True}); {} = unprocessed; None = not recorded.
    - `prepend_bos`, `context_size`: how its training text was fed, as recorded.
    - `metadata`: everything sae-lens recorded.
    """

    sae: Any
    source: str
    sae_id: str | None
    architecture: str
    hook_name: str
    layer: int | None
    d_in: int
    d_sae: int
    normalize_activations: str
    norm_scaling_factor: float | None
    norm_scaling_folded: bool
    model_name: str | None
    model_from_pretrained_kwargs: dict[str, Any] | None
    prepend_bos: bool | None
    context_size: int | None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def W_enc(self) -> torch.Tensor:
        """Encoder [d_in, d_sae]."""
        return self.sae.W_enc.detach()

    @property
    def W_dec(self) -> torch.Tensor:
        """Decoder [d_sae, d_in]; row i is feature i's write per unit of activation (`fold_decoder_norms`)."""
        return self.sae.W_dec.detach()

    @property
    def b_enc(self) -> torch.Tensor | None:
        """Encoder bias [d_sae] (None for architectures without one, e.g. gated: see `sae.b_gate`)."""
        b = getattr(self.sae, "b_enc", None)
        return b.detach() if isinstance(b, torch.Tensor) else None

    @property
    def b_dec(self) -> torch.Tensor:
        """Decoder bias [d_in] (taken off the input before encoding when `cfg.apply_b_dec_to_input`)."""
        return self.sae.b_dec.detach()

    @property
    def threshold(self) -> torch.Tensor | None:
        """JumpReLU thresholds [d_sae], else None."""
        t = getattr(self.sae, "threshold", None)
        return t.detach() if isinstance(t, torch.Tensor) and self.architecture == "jumprelu" else None

    @property
    def k(self) -> int | None:
        """Active features per token of a TopK SAE, else None."""
        return getattr(self.sae.cfg, "k", None)

    @property
    def is_residual(self) -> bool:
        return is_residual_hook(self.hook_name)

    def __repr__(self) -> str:
        return (f"LoadedSAE({self.architecture}, {self.hook_name}, d_in={self.d_in}, d_sae={self.d_sae}, "
                f"source={self.source!r}, id={self.sae_id!r})")


SPARSE_DECODE_DENSITY = 0.01  # below this share of nonzero entries a CPU decodes a code as a sparse tensor


def sae_decode(sae, f: torch.Tensor) -> torch.Tensor:
    """sae-lens's own decode of a code f [n, d_sae] (sae: a LoadedSAE or an sae-lens SAE), as `sae.decode(f)`.

    On a CPU a code with under 1% nonzero entries (a released SAE's L0 of tens to hundreds among thousands of
    features; a one-hot row per feature) is handed over as a sparse tensor, so that sae-lens's `f @ W_dec` is
    a sparse product, L0 x d_in per token instead of d_sae x d_in (309 GFLOP dense for 8,192 tokens of a
    24,576-feature GPT-2 SAE). The result equals the dense decode up to the order of summation. Elsewhere (a
    GPU, bf16, a denser code, an SAE class whose decode takes no sparse code) the dense code."""
    inner = getattr(sae, "sae", sae)
    sparse = (f.device.type == "cpu" and f.ndim == 2 and f.dtype in (torch.float32, torch.float64)
              and int(torch.count_nonzero(f)) < SPARSE_DECODE_DENSITY * f.numel())
    if sparse:
        try:
            return inner.decode(f.to_sparse())
        except (RuntimeError, NotImplementedError, TypeError):  # a decode written for dense codes only
            pass
    return inner.decode(f)


# architectures whose activation of a feature reads that feature's pre-activation alone (ReLU; ReLU times a
# per-feature threshold test); TopK's reads every feature's (the k largest)
ONE_FEATURE_ARCHITECTURES = ("standard", "jumprelu")


def sae_architecture(sae) -> str | None:
    """sae-lens's architecture name of an SAE ("standard", "jumprelu", "topk", ...; sae: a LoadedSAE or an
    sae-lens SAE); None for an object without sae-lens's config (a stand-in with an `encode` only)."""
    cfg = getattr(getattr(sae, "sae", sae), "cfg", None)
    return cfg.architecture() if callable(getattr(cfg, "architecture", None)) else None


def feature_activation(sae, x: torch.Tensor, feature: int) -> torch.Tensor:
    """[...]: one feature's activation at inputs x [..., d_in], equal to `sae.encode(x)[..., feature]` up to
    the order of the encoder's sum (sae: a LoadedSAE or an sae-lens SAE).

    Where the architecture allows (`ONE_FEATURE_ARCHITECTURES`) only that feature's encoder column is used:
    sae-lens's own input processing (`process_sae_in`: dtype, hook_z reshape, input norm, b_dec), then d_in
    multiply-adds per position instead of d_in x d_sae, and its own activation. Elsewhere the whole encode."""
    inner = getattr(sae, "sae", sae)
    arch = sae_architecture(inner)
    if arch not in ONE_FEATURE_ARCHITECTURES:
        return inner.encode(x)[..., feature]
    pre = inner.process_sae_in(x) @ inner.W_enc[:, feature] + inner.b_enc[feature]
    act = inner.activation_fn(pre)
    if arch == "jumprelu":
        act = act * (pre > inner.threshold[feature]).to(act.dtype)
    return act


# ------------------------------------------------------------------------------------------------------------
# Loading


def load_saes(
    source: str | os.PathLike,
    sae_ids: list[str | int] | str | int | None = None,
    *,
    model=None,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
) -> list[LoadedSAE]:
    """Load SAEs from a sae-lens release, a local folder, or "demo"; one `LoadedSAE` per id, in order.

    - Release (e.g. "gemma-scope-2b-pt-res-canonical"): `sae_ids` are ids of that release
      ("layer_3/width_16k/canonical"); they are all checked before anything is downloaded.
    - Local folder: either one SAE saved by sae-lens (`cfg.json` + `sae_weights.safetensors`), or a folder of
      such folders; then `sae_ids` name subfolders (an int L means "layer_L"), None loads them all.
    - "demo": the project's demo SAEs, pinned in `data/demo_saes/default/` (see `demo_sae_folder`); ids as for
      a folder. Loading never trains: a damaged or missing pinned file is a clear `SAEError`.
      "demo:<config>" loads another config, e.g. "demo:attn" (the attention-output SAEs).

    With `model`, every SAE is checked with `check_fits`. `dtype` (e.g. "float32") overrides the stored one.
    """
    ids = [sae_ids] if isinstance(sae_ids, (str, int)) else (list(sae_ids) if sae_ids is not None else None)
    dtype_str = _dtype_str(dtype)
    if str(source) == "demo" or str(source).startswith("demo:"):  # "demo:attn": the prepared config "attn"
        config = str(source).partition(":")[2] or "default"
        loaded = _load_folder(demo_sae_folder(config), ids, device, dtype_str, label=str(source))
    elif _looks_like_path(source):
        loaded = _load_folder(Path(source).expanduser(), ids, device, dtype_str, label=str(source))
    else:
        loaded = _load_release(str(source), ids, device, dtype_str)
    if model is not None:
        for sae in loaded:
            check_fits(sae, model)
    return loaded


# ------------------------------------------------------------------------------------------------------------
# The demo SAEs: pinned in the repository, or a training with other parameters recorded by the prepare stage

PINNED_DIR = paths.REPO_ROOT / "data" / "demo_saes"  # committed: data/demo_saes/<config>/
CHECKSUMS = "SHA256SUMS"  # in each pinned folder, `sha256sum` format: "<hex>  <path relative to the folder>"
LAYER_FILES = ("cfg.json", "sae_weights.safetensors", "metrics.json")
CHECKED_FILES = ("cfg.json", "sae_weights.safetensors")  # their sha256 is recorded in a layer's metrics.json

# The bar the demo SAEs should reach on held-out text (in the manifest and chapter 4's table, never enforced).
TARGET_BAR = {"explained_variance_min": 0.8, "mean_l0_max": 32, "dead_fraction_max": 0.2}


def sweep_path(config: str) -> Path:
    """The training sweep of a demo config (`python -m weightscope.prepare.demo_saes --sweep NAME`): beside the
    pinned folders, outside them (their checksums cover the SAEs only)."""
    return PINNED_DIR / f"{config}_sweep.json"


def demo_sae_folder(config: str = "default") -> Path:
    """The folder of the demo SAEs of `config`: the pinned `data/demo_saes/<config>/` (checksums verified),
    unless the prepare stage trained this config with other parameters than the pinned ones (then its
    pointer `data/cache/demo_saes/<config>.json` names that training's folder).

    Raises SAEError when a pinned file is damaged or missing (saying how to restore it), or when there are
    neither pinned SAEs of `config` nor a prepared training.
    """
    pinned = pinned_demo_folder(config)
    trained = _pointer_folder(config)
    if trained is not None and (pinned is None or trained.name != pinned_cache_key(pinned)):
        return trained  # trained with other parameters than the pinned SAEs (the user's retrain path)
    if pinned is not None:
        verify_pinned(pinned)
        return pinned
    raise SAEError(
        f"no demo SAEs of config {config!r}: {PINNED_DIR / config} is not in this checkout and none were "
        f"prepared (no {demo_sae_pointer(config)}). Restore the shipped ones with `git checkout -- "
        f"data/demo_saes`, or train them with `python -m weightscope.prepare.demo_saes --config {config}`."
    )


def pinned_demo_folder(config: str = "default") -> Path | None:
    """`data/demo_saes/<config>/` when the repository ships demo SAEs of `config`, else None."""
    folder = PINNED_DIR / config
    return folder if (folder / CHECKSUMS).is_file() else None


def pinned_cache_key(folder: Path) -> str | None:
    """The cache folder name (`<config>-<key>`) the pinned SAEs were trained as: a training with the same
    parameters, corpus, tokenizer and model gets this name."""
    try:
        return read_manifest(folder).get("cache_key")
    except (OSError, ValueError):
        return None


def read_checksums(folder: Path) -> dict[str, str]:
    """{path relative to `folder`: sha256} from `folder/SHA256SUMS`."""
    out = {}
    for line in (Path(folder) / CHECKSUMS).read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            out[name.lstrip("*")] = digest
    return out


def write_checksums(folder: Path) -> dict[str, str]:
    """Write `folder/SHA256SUMS` over every other file below `folder`; returns what it wrote."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    sums = {p.relative_to(folder).as_posix(): file_sha256(p) for p in files}
    text = "".join(f"{digest}  {name}\n" for name, digest in sums.items())
    (folder / CHECKSUMS).write_text(text)
    return sums


def pinned_problems(folder: Path) -> list[str]:
    """What differs between a pinned folder and its SHA256SUMS: missing, damaged (sha256 differs) or extra
    files. Empty when every file is as shipped."""
    folder = Path(folder)
    expected = read_checksums(folder)
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*")
               if p.is_file() and p.name != CHECKSUMS}
    problems = [f"{name} is missing" for name in sorted(set(expected) - present)]
    problems += [f"{name} is damaged (its sha256 differs)" for name in sorted(set(expected) & present)
                 if file_sha256(folder / name) != expected[name]]
    problems += [f"{name} is not a shipped file" for name in sorted(present - set(expected))
                 if name.endswith((".safetensors", ".json"))]
    return problems


def verify_pinned(folder: Path) -> None:
    """Raise SAEError naming every file of a pinned demo-SAE folder that differs from its SHA256SUMS."""
    problems = pinned_problems(folder)
    if problems:
        raise SAEError(
            f"the pinned demo SAEs in {folder} do not match {folder / CHECKSUMS}: {'; '.join(problems)}. "
            "Restore the shipped files with `git checkout -- data/demo_saes` (or, to replace them on "
            "purpose, retrain with `make demo-saes` and adopt the result as it explains)."
        )


def _pointer_folder(config: str) -> Path | None:
    """The folder the prepare stage recorded for `config`, if it still holds a manifest."""
    try:
        folder = Path(json.loads(demo_sae_pointer(config).read_text())["folder"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return folder if (folder / "manifest.json").is_file() else None


def demo_sae_pointer(config: str = "default") -> Path:
    """`data/cache/demo_saes/<config>.json`: the folder of a demo-SAE training with other parameters than the
    pinned ones (written by `weightscope.prepare.demo_saes`)."""
    return paths.cache_dir() / "demo_saes" / f"{config}.json"


def read_manifest(root: Path) -> dict[str, Any]:
    """The `manifest.json` of a demo-SAE folder (pinned or trained): parameters, sources, versions,
    quality."""
    return json.loads((Path(root) / "manifest.json").read_text())


def meets_bar(metrics: dict[str, float]) -> bool:
    """Whether one layer's held-out metrics reach `TARGET_BAR`."""
    return (
        metrics["explained_variance"] >= TARGET_BAR["explained_variance_min"]
        and metrics["mean_l0"] <= TARGET_BAR["mean_l0_max"]
        and metrics["dead_fraction"] <= TARGET_BAR["dead_fraction_max"]
    )


def layer_dir(root: Path, layer: int) -> Path:
    return Path(root) / f"layer_{layer}"


def layer_problem(root: Path, layer: int) -> str | None:
    """Why a trained layer folder cannot be trusted, or None (also when it is absent: then it is missing).

    Checks the files' sha256 against those recorded in `metrics.json`. A folder from before checksums were
    recorded is read whole instead (safetensors and JSON parse); when it reads, its checksums are recorded.
    """
    folder = layer_dir(root, layer)
    if not folder.is_dir():
        return None
    absent = [f for f in LAYER_FILES if not (folder / f).is_file()]
    if absent:
        return f"the demo SAE folder {folder} lacks {absent}"
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return f"{folder / 'metrics.json'} is damaged"
    recorded = metrics.get("sha256")
    if recorded:
        bad = [f for f in CHECKED_FILES if file_sha256(folder / f) != recorded.get(f)]
        return f"the demo SAE file(s) {bad} in {folder} are damaged (sha256 differs)" if bad else None
    try:
        from safetensors.numpy import load_file

        load_file(str(folder / "sae_weights.safetensors"))
        json.loads((folder / "cfg.json").read_text())
    except Exception as err:  # SafetensorError, JSONDecodeError, OSError: all mean "cannot be read"
        return f"the demo SAE in {folder} cannot be read ({type(err).__name__})"
    metrics["sha256"] = {f: file_sha256(folder / f) for f in CHECKED_FILES}
    atomic_write_json(folder / "metrics.json", metrics)
    return None


# ------------------------------------------------------------------------------------------------------------


def _dtype_str(dtype: str | torch.dtype | None) -> str | None:
    if dtype is None or isinstance(dtype, str):
        return dtype
    return str(dtype).removeprefix("torch.")


def _looks_like_path(source: str | os.PathLike) -> bool:
    s = str(source)
    return isinstance(source, os.PathLike) or Path(s).expanduser().exists() or s.startswith((".", "/", "~"))


def pretrained_directory() -> dict[str, Any]:
    """sae-lens's bundled directory of pretrained SAEs: {release: lookup with `.saes_map` {id: path}, ...}.

    Read from the yaml file shipped inside sae-lens: no network.
    """
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory()


def validate_release(release: str, sae_ids: list[str] | None) -> list[str]:
    """Check `release` and `sae_ids` against sae-lens's directory (offline); return the ids.

    Raises `SAEError` naming close matches when the release or an id is unknown, or when no ids are given.
    """
    directory = pretrained_directory()
    if release not in directory:
        close = difflib.get_close_matches(release, list(directory), n=5, cutoff=0.5)
        hint = f" Close matches: {close}." if close else ""
        raise SAEError(
            f"unknown sae-lens release {release!r}.{hint} See sae_lens's pretrained_saes.yaml "
            "(weightscope.load.saes.pretrained_directory() lists all releases), or pass a local folder."
        )
    known = list(directory[release].saes_map)
    if not sae_ids:
        raise SAEError(
            f"no sae_ids given for release {release!r}, which has {len(known)} SAEs (e.g. {known[:3]}); "
            "pass the ids to load, e.g. one per layer."
        )
    bad = [str(i) for i in sae_ids if str(i) not in directory[release].saes_map]
    if bad:
        lines = []
        for b in bad:
            close = difflib.get_close_matches(b, known, n=3, cutoff=0.6)
            lines.append(f"{b!r}" + (f" (close: {close})" if close else ""))
        raise SAEError(
            f"release {release!r} has no SAE with id {', '.join(lines)}. It has {len(known)} ids, e.g. "
            f"{known[:4]}. Fix the ids (params `saes.id_template`)."
        )
    return [str(i) for i in sae_ids]


def _load_release(release: str, sae_ids: list | None, device: str, dtype: str | None) -> list[LoadedSAE]:
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import get_norm_scaling_factor

    ids = validate_release(release, sae_ids)  # all ids checked before the first download
    out = []
    for sae_id in ids:
        try:
            sae = SAE.from_pretrained(release, sae_id, device=device, dtype=dtype or "float32")
        except Exception as exc:
            if _is_download_error(exc):
                raise SAEError(
                    f"could not download SAE {sae_id!r} of release {release!r} from the Hugging Face hub "
                    f"({type(exc).__name__}: {exc}). Connect to the internet (and unset HF_HUB_OFFLINE), log "
                    "in if the repository is gated, or use a local folder saved with `sae.save_model(path)`."
                ) from exc
            raise
        factor = get_norm_scaling_factor(release, sae_id)
        folded = factor is not None and sae.cfg.normalize_activations == "none"  # sae-lens folds it on load
        out.append(_describe(sae, release, sae_id, factor, folded=folded))
    return out


def _is_download_error(exc: Exception) -> bool:
    """Whether `exc` means "could not reach / fetch from the hub" (offline, gated, missing file)."""
    import requests

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__module__.startswith("huggingface_hub") or isinstance(
            exc, (requests.ConnectionError, requests.HTTPError, ConnectionError, TimeoutError)
        ):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _is_sae_folder(path: Path) -> bool:
    return all((path / f).is_file() for f in SAE_FILES)


def _load_folder(root: Path, ids: list | None, device: str, dtype: str | None, label: str) -> list[LoadedSAE]:
    if not root.is_dir():
        raise SAEError(f"SAE folder {root} does not exist. Pass a folder saved by `sae.save_model(path)`.")
    if _is_sae_folder(root):
        if ids:
            raise SAEError(f"{root} holds a single SAE; do not pass sae_ids ({ids}) for it.")
        return [_load_one(root, label, None, device, dtype)]
    available = sorted((p.name for p in root.iterdir() if p.is_dir() and _is_sae_folder(p)), key=_natural)
    if not available:
        raise SAEError(
            f"{root} holds no sae-lens SAE (expected {' + '.join(SAE_FILES)}, or subfolders with them). "
            "Save SAEs with `sae.save_model(path)`."
        )
    names = available if ids is None else [f"layer_{i}" if isinstance(i, int) else str(i) for i in ids]
    bad = [n for n in names if n not in available]
    if bad:
        close = {b: difflib.get_close_matches(b, available, n=3, cutoff=0.6) for b in bad}
        raise SAEError(f"{root} has no SAE folder(s) {bad} (close: {close}); it has {available}.")
    return [_load_one(root / n, label, n, device, dtype) for n in names]


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _load_one(path: Path, label: str, sae_id: str | None, device: str, dtype: str | None) -> LoadedSAE:
    from sae_lens import SAE

    with warnings.catch_warnings():
        # sae-lens warns on every load of an SAE trained with processing flags; LoadedSAE reports them instead
        warnings.filterwarnings("ignore", message="(?s).*non-empty model_from_pretrained_kwargs")
        sae = SAE.load_from_disk(str(path), device=device, dtype=dtype)
    return _describe(sae, label, sae_id, None, folded=False)


def _describe(sae, source: str, sae_id: str | None, norm_factor: float | None, folded: bool) -> LoadedSAE:
    fold_decoder_norms(sae)
    meta = sae.cfg.metadata
    hook = meta.hook_name
    if not hook:
        raise SAEError(
            f"SAE {sae_id or source} records no hook name (cfg.json `metadata.hook_name`); set "
            "`sae.cfg.metadata.hook_name` (e.g. 'blocks.3.hook_resid_post') and save it again."
        )
    mfpk = meta.model_from_pretrained_kwargs
    return LoadedSAE(
        sae=sae,
        source=source,
        sae_id=sae_id,
        architecture=sae.cfg.architecture(),
        hook_name=hook,
        layer=hook_layer(hook),
        d_in=sae.cfg.d_in,
        d_sae=sae.cfg.d_sae,
        normalize_activations=sae.cfg.normalize_activations,
        norm_scaling_factor=norm_factor,
        norm_scaling_folded=folded,
        model_name=meta.model_name,
        model_from_pretrained_kwargs=dict(mfpk) if mfpk is not None else None,
        prepend_bos=meta.prepend_bos,
        context_size=meta.context_size,
        metadata=meta.to_dict(),
    )


def fold_decoder_norms(sae) -> bool:
    """Make each decoder row the feature's write per unit of activation; True when the SAE was changed.

    A TopK SAE that rescales by its decoder norms (`rescale_acts_by_decoder_norm`) writes a W_dec[i] /
    |W_dec[i]| per unit of activation, not a W_dec[i], which is what the chapters read a row as (direct
    effects, ablations, reads). sae-lens's own `fold_W_dec_norm` turns it into the same function with
    unit-norm rows (the norms moved into the encoder). SAEs whose rows already have unit norm (sae-lens
    saves its trained TopK SAEs so) are left exactly as they are."""
    if not getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        return False
    norms = sae.W_dec.detach().float().norm(dim=-1)
    if torch.allclose(norms, torch.ones_like(norms), atol=1e-4):
        return False
    sae.fold_W_dec_norm()
    return True


# ------------------------------------------------------------------------------------------------------------
# Hooks, layers and fit


def hook_layer(hook_name: str) -> int | None:
    """L of a `blocks.{L}.…` hook name, else None."""
    match = _BLOCK_HOOK.match(hook_name)
    return int(match.group(1)) if match else None


def is_residual_hook(hook_name: str) -> bool:
    """Whether the hook is `blocks.{L}.hook_resid_pre|mid|post`."""
    match = _BLOCK_HOOK.match(hook_name)
    return bool(match) and match.group(2) in RESIDUAL_HOOKS


def _as_loaded(sae) -> LoadedSAE:
    return sae if isinstance(sae, LoadedSAE) else _describe(sae, "object", None, None, folded=False)


def expected_d_in(hook_name: str, model_cfg) -> tuple[int, str] | None:
    """(width, what it is) that a hook's activations have in a model, or None when not known."""
    suffix = _BLOCK_HOOK.match(hook_name).group(2) if _BLOCK_HOOK.match(hook_name) else hook_name
    residual_width = RESIDUAL_HOOKS + ("hook_attn_out", "hook_mlp_out", "hook_mlp_in", "hook_attn_in")
    if suffix in residual_width or hook_name in ("hook_embed", "hook_pos_embed", "ln_final.hook_normalized"):
        return model_cfg.d_model, "d_model"
    if suffix == "attn.hook_z":
        return model_cfg.n_heads * model_cfg.d_head, "n_heads * d_head"
    if suffix in ("mlp.hook_post", "mlp.hook_pre") and model_cfg.d_mlp:
        return model_cfg.d_mlp, "d_mlp"
    return None


def check_fits(sae, model) -> None:
    """Refuse an SAE that cannot read `model`: its layer is out of range, its hook is not a hook of the model,
    or its input width differs from the hook's width (d_model for residual-stream hooks). `sae` is a
    `LoadedSAE` or a sae-lens SAE."""
    s = _as_loaded(sae)
    n_layers = model.cfg.n_layers
    name = s.sae_id or s.source
    if s.layer is not None and not 0 <= s.layer < n_layers:
        raise SAEError(
            f"SAE {name} reads layer {s.layer} ({s.hook_name}), but the model has {n_layers} layers "
            f"(0..{n_layers - 1}). Load the SAEs of this model, or drop that layer from `layers:`."
        )
    if s.hook_name not in model.hook_dict:
        close = difflib.get_close_matches(s.hook_name, list(model.hook_dict), n=3, cutoff=0.6)
        raise SAEError(
            f"SAE {name} reads hook {s.hook_name!r}, which this model does not have"
            + (f" (close: {close})" if close else "")
            + ". It was made for another architecture or hook naming; use SAEs made for this model."
        )
    want = expected_d_in(s.hook_name, model.cfg)
    if want is not None and s.d_in != want[0]:
        raise SAEError(
            f"SAE {name} has d_in={s.d_in}, but {s.hook_name} of this model has width {want[1]}={want[0]}: "
            f"the SAE was trained on another model ({s.model_name or 'unrecorded'}). Use SAEs for "
            f"{getattr(model.cfg, 'model_name', 'this model')}."
        )


def require_residual(sae) -> LoadedSAE:
    """Return the SAE as a `LoadedSAE` if it reads the residual stream (`blocks.{L}.hook_resid_pre|mid|post`);
    refuse it otherwise, for chapters whose maths assumes residual-stream features."""
    s = _as_loaded(sae)
    if not s.is_residual:
        raise SAEError(
            f"this chapter needs residual-stream SAEs (blocks.L.hook_resid_pre/mid/post), but SAE "
            f"{s.sae_id or s.source} reads {s.hook_name}. Use a residual release (e.g. "
            "gemma-scope-2b-pt-res-canonical, gpt2-small-res-jb, llama_scope_lxr_8x, or the demo SAEs)."
        )
    return s


# ------------------------------------------------------------------------------------------------------------
# Attention-output SAEs (chapter 4)

ATTENTION_Z_HOOK = "attn.hook_z"  # the heads' outputs before W_O: [batch, pos, n_heads, d_head]


def is_attention_z_hook(hook_name: str) -> bool:
    """Whether the hook is `blocks.{L}.attn.hook_z`, the concatenated heads' outputs before `W_O`."""
    match = _BLOCK_HOOK.match(hook_name)
    return bool(match) and match.group(2) == ATTENTION_Z_HOOK


def require_attention_z(sae, model_cfg=None) -> LoadedSAE:
    """Return the SAE as a `LoadedSAE` if it reads `blocks.{L}.attn.hook_z` (flattened to n_heads * d_head,
    head-major, as sae-lens's `reshape_activations: hook_z` and its activation store both flatten it);
    refuse it otherwise. With `model_cfg`, also check that d_in = n_heads * d_head and that the SAE adds no
    run-time input normalisation the chapter's exact decompositions would miss."""
    s = _as_loaded(sae)
    name = s.sae_id or s.source
    if not is_attention_z_hook(s.hook_name):
        why = (" It reads the attention output after W_O, where the heads are already summed, so a decoder "
               "row has no per-head slices." if s.hook_name.endswith("hook_attn_out") else "")
        raise SAEError(
            f"this chapter needs attention-output SAEs on blocks.L.attn.hook_z, but SAE {name} reads "
            f"{s.hook_name}.{why} Use a hook_z release (gpt2-small-hook-z-kk, "
            "gemma-scope-2b-pt-att-canonical, or the demo attention SAEs: "
            "`attn_saes: {source: 'demo:attn'}`)."
        )
    if s.normalize_activations not in ("none", None):
        raise SAEError(
            f"SAE {name} normalises its input at run time ({s.normalize_activations!r}); the chapter's "
            "decompositions assume a linear encoder. Load it through a release that folds the "
            "scaling (sae-lens does for published norm factors)."
        )
    if model_cfg is not None and s.d_in != model_cfg.n_heads * model_cfg.d_head:
        raise SAEError(
            f"SAE {name} has d_in={s.d_in}, but hook_z of this model is n_heads * d_head = "
            f"{model_cfg.n_heads} * {model_cfg.d_head} = {model_cfg.n_heads * model_cfg.d_head}. Use "
            "attention SAEs made for this model."
        )
    return s
