"""Target parameters files (`params/<target>.yaml`): loading and strict validation.

Every mistake in a parameters file is reported before any work starts, as one `ParamsError` that names the
file, the key, what was wrong and what to do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from weightscope.config.paths import REPO_ROOT

PARAMS_DIR = REPO_ROOT / "params"
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
_TOP_KEYS = {"target", "title", "model", "saes", "attn_saes", "layers", "device", "dtype", "chapters"}
_MODEL_KEYS = {"name", "processing"}
_SAE_KEYS = {"source", "id_template", "neuronpedia"}
PROCESSING_FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases",
                    "refactor_factored_attn_matrices")  # TransformerLens weight-processing options
PARAMS_FILE = "params_file"  # the notebook parameter the book runner sets: the parameters file, name or path
NOTEBOOK_PARAMETERS = (PARAMS_FILE,)  # set by the runner, never overridden


class ParamsError(ValueError):
    """A parameters file is malformed; the message says where and how to fix it."""


@dataclass(frozen=True)
class Target:
    """One validated parameters file."""

    target: str
    title: str
    model_name: str
    processing: dict[str, bool] | str  # flags, or "auto" = the flags recorded with the SAEs
    sae_source: str  # "demo", a sae-lens release name, or a local folder
    sae_id_template: str | None
    neuronpedia: str | None  # Neuronpedia id template such as "gemma-2-2b/{layer}-gemmascope-res-16k"
    layers: list[int] | str  # "all" or explicit indices
    device: str
    dtype: str
    chapters: dict[str, dict[str, Any]] = field(default_factory=dict)
    path: Path | None = None
    attn_saes: dict[str, str | None] | None = None  # attention-output SAEs: {source, id_template, neuronpedia}

    def as_dict(self) -> dict[str, Any]:
        """Plain-data view, stored next to every result."""
        d = {k: v for k, v in self.__dict__.items() if k != "path"}
        d["path"] = str(self.path) if self.path else None
        return d

    def chapter_params(self, chapter: str) -> dict[str, Any]:
        """Overrides this target sets for one chapter (keyed by notebook stem, e.g. `01_output_tokens`)."""
        return dict(self.chapters.get(chapter, {}))

    def resolve_layers(self, n_layers: int) -> list[int]:
        """Layer indices to analyse, checked against the model's depth."""
        if self.layers == "all":
            return list(range(n_layers))
        bad = [layer for layer in self.layers if not 0 <= layer < n_layers]
        if bad:
            raise ParamsError(
                f"{self._where('layers')}: layer(s) {bad} out of range; the model has {n_layers} layers "
                f"(valid: 0..{n_layers - 1}). Fix `layers:` or use `all`."
            )
        return list(self.layers)

    def sae_ids(self, layers: list[int]) -> list[str] | None:
        """sae-lens ids for the given layers, from `saes.id_template`."""
        if self.sae_id_template is None:
            return None
        return [self.sae_id_template.format(layer=layer) for layer in layers]

    def sae_names(self, layers: list[int]) -> list[str]:
        """The residual SAEs' names for the given layers: their sae-lens ids, else a folder's `layer_L`."""
        return self.sae_ids(layers) or [f"layer_{layer}" for layer in layers]

    def attn_sae_ids(self, layers: list[int]) -> list[str] | None:
        """sae-lens ids of the attention-output SAEs for the given layers (None: folder layout `layer_L`)."""
        if self.attn_saes is None:
            raise ParamsError(f"{self._where('attn_saes')}: this target names no attention-output SAEs; add "
                              "`attn_saes: {source: ..., id_template: ...}` (see params/gpt2-small.yaml).")
        template = self.attn_saes.get("id_template")
        return None if template is None else [template.format(layer=layer) for layer in layers]

    def _where(self, key: str) -> str:
        return f"{self.path or self.target}: `{key}`"


def available_targets() -> list[str]:
    """Names of the parameters files shipped in `params/`."""
    return sorted(p.stem for p in PARAMS_DIR.glob("*.yaml"))


def load_target(name_or_path: str | Path) -> Target:
    """Load and validate `params/<name>.yaml` (or an explicit path to a YAML file)."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PARAMS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ParamsError(
            f"no parameters file {path}. Known targets: {', '.join(available_targets())}; "
            f"or copy params/demo.yaml to params/<new>.yaml and edit it."
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML ({err}). Fix the syntax.") from None
    target = parse_target(raw, path=path)
    if target.target != path.stem:  # a copied file that kept `target: demo` would overwrite the demo's book
        raise ParamsError(
            f"{path}: `target` is {target.target!r} but the file is named {path.name}; the target name "
            f"picks the folders its pages and tables go to. Set `target: {path.stem}` (or rename the file "
            f"to {target.target}.yaml)."
        )
    return target


def parse_target(raw: Any, *, path: Path | None = None) -> Target:
    """Validate a parsed YAML mapping into a `Target`; raise `ParamsError` on the first problem."""
    where = str(path or "<params>")
    _require_mapping(raw, where, "the file")
    _no_unknown(raw, _TOP_KEYS, where, "top level")
    for key in ("target", "model", "saes"):
        if key not in raw:
            raise ParamsError(f"{where}: missing required key `{key}`. See params/demo.yaml for a complete example.")
    model = raw["model"]
    saes = raw["saes"]
    _require_mapping(model, where, "model")
    _require_mapping(saes, where, "saes")
    _no_unknown(model, _MODEL_KEYS, where, "model")
    _no_unknown(saes, _SAE_KEYS, where, "saes")
    return Target(
        target=_name(raw["target"], where),
        title=_string(raw.get("title", raw["target"]), where, "title"),
        model_name=_local(_string(model.get("name"), where, "model.name"), path),
        processing=_processing(model.get("processing", "auto"), where),
        sae_source=_local(_string(saes.get("source"), where, "saes.source"), path),
        sae_id_template=_template(saes.get("id_template"), where, "saes.id_template"),
        neuronpedia=_template(saes.get("neuronpedia"), where, "saes.neuronpedia"),
        layers=_layers(raw.get("layers", "all"), where),
        device=_choice(raw.get("device", "auto"), DEVICES, where, "device"),
        dtype=_choice(raw.get("dtype", "float32"), DTYPES, where, "dtype"),
        chapters=_chapters(raw.get("chapters") or {}, where),
        path=path,
        attn_saes=_attn_saes(raw.get("attn_saes"), where, path),
    )


def _local(value: str, path: Path | None) -> str:
    """A folder written "./x" or "../x" is relative to the parameters file (not to wherever the book runs
    from: the pre-flight and the chapters run in different folders); "~" is the home folder."""
    if value.startswith(("./", "../")) and path is not None:
        return str((Path(path).parent / value).resolve())
    return str(Path(value).expanduser()) if value.startswith("~") else value


def _attn_saes(value: Any, where: str, path: Path | None = None) -> dict[str, str | None] | None:
    if value is None:
        return None
    _require_mapping(value, where, "attn_saes")
    _no_unknown(value, _SAE_KEYS, where, "attn_saes")
    return {"source": _local(_string(value.get("source"), where, "attn_saes.source"), path),
            "id_template": _template(value.get("id_template"), where, "attn_saes.id_template"),
            "neuronpedia": _template(value.get("neuronpedia"), where, "attn_saes.neuronpedia")}


def _require_mapping(value: Any, where: str, what: str) -> None:
    if not isinstance(value, dict):
        raise ParamsError(f"{where}: {what} must be a mapping of keys to values, got {type(value).__name__}.")


def _no_unknown(mapping: dict, allowed: set[str], where: str, what: str) -> None:
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise ParamsError(
            f"{where}: unknown key(s) {unknown} in {what}; allowed: {sorted(allowed)}. Check the spelling."
        )


def _string(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ParamsError(f"{where}: `{key}` must be a non-empty string, got {value!r}.")
    return value


def _name(value: Any, where: str) -> str:
    value = _string(value, where, "target")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
        raise ParamsError(f"{where}: `target` {value!r} must be letters, digits, '.', '_' or '-' (it names a folder).")
    return value


def _template(value: Any, where: str, key: str) -> str | None:
    if value is None:
        return None
    value = _string(value, where, key)
    try:
        value.format(layer=0)
    except (KeyError, IndexError, ValueError):
        raise ParamsError(f"{where}: `{key}` {value!r} may use only the placeholder {{layer}}.") from None
    return value


def _choice(value: Any, choices: tuple[str, ...], where: str, key: str) -> str:
    if value not in choices:
        raise ParamsError(f"{where}: `{key}` is {value!r}; choose one of {list(choices)}.")
    return value


def _processing(value: Any, where: str) -> dict[str, bool] | str:
    if value == "auto":
        return value
    _require_mapping(value, where, "model.processing")
    _no_unknown(value, set(PROCESSING_FLAGS), where, "model.processing")
    bad = {k: v for k, v in value.items() if not isinstance(v, bool)}
    if bad:
        raise ParamsError(f"{where}: model.processing flags must be true/false, got {bad}.")
    return dict(value)


def _layers(value: Any, where: str) -> list[int] | str:
    if value == "all":
        return value
    ok = isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ok:
        raise ParamsError(f"{where}: `layers` must be `all` or a non-empty list of integers, got {value!r}.")
    if any(v < 0 for v in value) or len(set(value)) != len(value):
        raise ParamsError(f"{where}: `layers` {value} must be distinct, non-negative layer indices.")
    return sorted(value)


def _chapters(value: Any, where: str) -> dict[str, dict[str, Any]]:
    _require_mapping(value, where, "chapters")
    for chapter, overrides in value.items():
        _require_mapping(overrides, where, f"chapters.{chapter}")
    return {str(k): dict(v) for k, v in value.items()}


def check_overrides(defaults: dict[str, Any], overrides: dict[str, Any], *, where: str) -> dict[str, Any]:
    """Merge chapter overrides into a notebook's defaults, refusing unknown names and wrong types.

    `defaults`: the notebook's parameters (name -> default value). Returns the merged mapping.
    """
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ParamsError(f"{where}: unknown parameter(s) {unknown}; this chapter takes {sorted(defaults)}.")
    merged = dict(defaults)
    for key, value in overrides.items():
        default = defaults[key]
        if default is not None and not _same_kind(default, value):
            raise ParamsError(
                f"{where}: parameter `{key}` should be {type(default).__name__} like its default {default!r}, "
                f"got {value!r}."
            )
        merged[key] = value
    return merged


def _same_kind(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def check_chapter_names(target: Target, known: list[str]) -> list[str]:
    """Problems with the names under `chapters:` (each must be a notebook stem, e.g. 01_output_tokens)."""
    import difflib

    out = []
    for name in sorted(set(target.chapters) - set(known)):
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        out.append(f"{target.path or target.target}: `chapters.{name}`: no chapter of that name{hint}; "
                   f"the chapters are {known}.")
    return out


def check_quantile(value: float, name: str) -> float:
    """A quantile parameter must lie in [0, 1]."""
    if not 0.0 <= float(value) <= 1.0:
        raise ParamsError(f"parameter `{name}` = {value} is a quantile and must lie between 0 and 1.")
    return float(value)
