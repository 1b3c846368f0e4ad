"""Result tables on disk: tidy parquet files with the parameters and versions that made them.

Every write is atomic (temporary file in the same folder, then `os.replace`), so a run killed at any point leaves
either the previous file or the new one, never a torn file. A table is reused only when its stored key (model,
SAEs, parameters, code version) equals the key of the current run.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from weightscope.config.paths import results_dir

_PACKAGES = ("weightscope", "torch", "transformer-lens", "sae-lens", "pandas")


def versions() -> dict[str, str]:
    """Versions of the packages that shape a result."""
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def code_fingerprint() -> str:
    """Hash of the library's source: any edit to weightscope's code invalidates cached results."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def cache_key(**parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (model, SAEs, parameters) plus code and package versions."""
    blob = json.dumps({**parts, "versions": versions(), "code": code_fingerprint()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a partial one."""
    path = Path(path)
    _ensure_writable(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def _ensure_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(
            f"cannot create the output folder {folder} ({err.strerror}). "
            f"Set WEIGHTSCOPE_DATA to a writable folder."
        ) from None
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"the output folder {folder} is not writable. Set WEIGHTSCOPE_DATA to a writable folder.")


def table_path(target: str, name: str) -> Path:
    """`data/results/<target>/<name>.parquet`."""
    return results_dir(target) / f"{name}.parquet"


def save_table(df: pd.DataFrame, target: str, name: str, *, key: str, params: dict[str, Any]) -> Path:
    """Atomically write a result table and its sidecar `<name>.json` (key, parameters, versions).

    The sidecar is written last: a table without a matching sidecar is treated as missing.
    """
    path = table_path(target, name)
    atomic_write_bytes(path, df.to_parquet(index=False))
    atomic_write_json(path.with_suffix(".json"), {"key": key, "params": params, "versions": versions(), "rows": len(df)})
    return path


def load_table(target: str, name: str, *, key: str | None = None) -> pd.DataFrame | None:
    """Read a result table back; None if it is missing or (when `key` is given) was made by another run."""
    path = table_path(target, name)
    meta = table_meta(target, name)
    if not path.is_file() or meta is None:
        return None
    if key is not None and meta.get("key") != key:
        return None
    df = pd.read_parquet(path)
    return df if len(df) == meta.get("rows") else None


def table_meta(target: str, name: str) -> dict[str, Any] | None:
    """The sidecar of a result table, or None."""
    side = table_path(target, name).with_suffix(".json")
    try:
        return json.loads(side.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def require_table(target: str, name: str, *, produced_by: str) -> pd.DataFrame:
    """Read a table that an earlier chapter must have written; a clear error if it has not."""
    df = load_table(target, name)
    if df is None:
        raise FileNotFoundError(
            f"the result table `{name}` for target `{target}` is missing ({table_path(target, name)}). "
            f"Run the chapter {produced_by} first (make book TARGET={target} runs all chapters in order)."
        )
    return df


def layer_tables(target: str, name: str, saes, provenance: dict[str, Any], compute) -> dict[str, pd.DataFrame]:
    """Per-SAE result tables, each cached under `<name>/layer_LL_<part>`: a rerun resumes at the first layer
    without a complete result, and a change of parameters, SAE or versions recomputes.

    compute(sae) -> {part: DataFrame}. Returns {part: the parts of every layer, concatenated}.
    """
    out: dict[str, list[pd.DataFrame]] = {}
    for sae in saes:
        key = cache_key(provenance=provenance, sae=sae.sae_id, layer=sae.layer)
        stem = f"{name}/layer_{sae.layer:02d}"
        marker = load_table(target, stem + "_parts", key=key)
        parts = marker["part"].tolist() if marker is not None else None
        frames = {p: load_table(target, f"{stem}_{p}", key=key) for p in parts} if parts else None
        if not frames or any(f is None for f in frames.values()):
            print(f"{name}: layer {sae.layer} ({sae.d_sae} features) ...", flush=True)
            frames = compute(sae)
            for part, frame in frames.items():
                save_table(frame, target, f"{stem}_{part}", key=key, params=provenance)
            # written last: marks the layer complete
            save_table(pd.DataFrame({"part": list(frames)}), target, stem + "_parts", key=key, params=provenance)
        for part, frame in frames.items():
            out.setdefault(part, []).append(frame)
    return {part: pd.concat(frames, ignore_index=True) for part, frames in out.items()}
