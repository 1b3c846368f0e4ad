"""Result tables on disk: tidy parquet files with the parameters and versions that made them.

Every write is atomic (temporary file in the same folder, then `os.replace`), so a run killed at any point leaves
either the previous file or the new one, never a torn file; files get the usual mode (0666 less the umask).
A table is reused only when its stored key (model, SAEs, parameters, code version) equals the key of the
current run and its bytes still have the sha256 its sidecar records: a damaged table is recomputed or
reported, never reused unread. Reads and writes are noted in the artefact log (`ARTIFACT_LOG`) that the book
runner keeps per chapter, so a reused chapter can be checked against the tables it used.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from weightscope.config.paths import progress_enabled, results_dir

_PACKAGES = ("weightscope", "torch", "transformer-lens", "sae-lens", "pandas")
ARTIFACT_LOG = "WEIGHTSCOPE_ARTIFACT_LOG"  # env var: the file noting reads and writes of cached artefacts


class StorageError(OSError):
    """A write failed for a reason the user can fix (disk full, no permission); the message names the path."""


class CacheError(RuntimeError):
    """A cached artefact is damaged and cannot be rebuilt here; the message names the file and the command."""


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


def folder_fingerprint(folder: Path | None) -> str | None:
    """A cheap fingerprint of a local folder's files (relative path, size, modification time; no reading), so
    a checkpoint or SAE saved again into the same folder changes the cache keys of what read it. None when
    `folder` is None or not a folder."""
    if folder is None or not Path(folder).is_dir():
        return None
    blob = [(p.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns)
            for p in sorted(Path(folder).rglob("*")) if p.is_file() for st in [p.stat()]]
    return hashlib.sha256(json.dumps(blob).encode()).hexdigest()[:16]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a partial one.

    The file gets mode 0666 less the umask (as `open` would give it), not mkstemp's private 0600. A full disk
    raises `StorageError` naming the path; the temporary file is removed and the old file kept.
    """
    path = Path(path)
    _ensure_writable(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            full = StorageError(f"no space left on the device while writing {path} ({len(data):,} bytes). "
                                f"Free some space there (or set WEIGHTSCOPE_DATA to a folder on another "
                                f"disk) and rerun: finished work is kept.")
            full.errno = err.errno
            raise full from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
    """Atomically write a result table and its sidecar `<name>.json` (key, parameters, versions, sha256).

    The sidecar is written last: a table without a matching sidecar is treated as missing.
    """
    path = table_path(target, name)
    data = parquet_bytes(df)
    atomic_write_bytes(path, data)
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_json(path.with_suffix(".json"), {"key": key, "params": params, "versions": versions(),
                                                  "rows": len(df), "sha256": digest})
    note_artifact(path, digest)
    return path


def parquet_bytes(df: pd.DataFrame) -> bytes:
    """df as parquet bytes that plain `pandas.read_parquet` also reads: an Arrow-backed list column
    (`compute.token_scores.list_column`) is recorded as an object column in the pandas metadata, since
    pandas cannot parse the Arrow list dtype's name back."""
    sink = pa.BufferOutputStream()
    pq.write_table(_arrow_table(df, preserve_index=False), sink)
    return sink.getvalue().to_pybytes()


def _arrow_table(df: pd.DataFrame, *, preserve_index: bool | None) -> pa.Table:
    """df in Arrow, its Arrow-backed list columns recorded as object columns in the pandas metadata."""
    table = pa.Table.from_pandas(df, preserve_index=preserve_index)
    meta = json.loads(table.schema.metadata[b"pandas"])
    for column in meta["columns"]:
        if column["pandas_type"].startswith("list") and column["numpy_type"].endswith("[pyarrow]"):
            column["numpy_type"] = "object"
    return table.replace_schema_metadata({**table.schema.metadata, b"pandas": json.dumps(meta).encode()})


def read_parquet(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """A parquet table whose list columns come back Arrow-backed (`list_column`), the rest as pandas reads them."""
    df = _pandas(pq.read_table(path, columns=columns))
    pa.default_memory_pool().release_unused()  # the decoding buffers: else kept (0.1 GB per 100k features)
    return df


def _pandas(table: pa.Table) -> pd.DataFrame:
    """An Arrow table in pandas, list columns Arrow-backed (`list_column`)."""
    def lists(dtype):
        return pd.ArrowDtype(dtype) if pa.types.is_list(dtype) or pa.types.is_large_list(dtype) else None

    return table.to_pandas(types_mapper=lists)


def load_table(target: str, name: str, *, key: str | None = None,
               columns: list[str] | None = None) -> pd.DataFrame | None:
    """Read a result table back (only `columns` when given: a wide table's unused list columns cost far more
    memory than their bytes on disk); None if it is missing, damaged, or (when `key` is given) made by another
    run.

    A damaged table (bytes that no longer match the sidecar's sha256, or unreadable) is reported on the
    terminal and treated as missing, so the caller recomputes it.
    """
    path = table_path(target, name)
    meta = table_meta(target, name)
    if not path.is_file() or meta is None:
        return None
    if key is not None and meta.get("key") != key:
        return None
    problem = table_problem(target, name)
    if problem:
        print(f"warning: {problem}; it is recomputed.", flush=True)
        return None
    df = read_parquet(path, columns=columns)
    if len(df) != meta.get("rows"):
        return None
    note_artifact(path, meta.get("sha256") or file_sha256(path))
    return df


def table_problem(target: str, name: str) -> str | None:
    """Why the stored table `name` cannot be trusted (missing, sidecar unreadable, checksum or parquet
    unreadable), or None when it verifies."""
    path = table_path(target, name)
    side = path.with_suffix(".json")
    if not path.is_file():
        return f"the result table {path} is missing"
    try:
        meta = json.loads(side.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return f"the sidecar {side} of the result table {path} is missing or damaged"
    if "sha256" in meta:
        if file_sha256(path) != meta["sha256"]:
            return f"the result table {path} is damaged (its sha256 differs from the one in {side.name})"
        return None
    try:  # a sidecar written before checksums were recorded: the table must at least read back whole
        rows = len(read_parquet(path))
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ...: all mean "cannot be read"
        return f"the result table {path} cannot be read ({type(err).__name__})"
    return None if rows == meta.get("rows") else f"the result table {path} has lost rows"


def table_meta(target: str, name: str) -> dict[str, Any] | None:
    """The sidecar of a result table, or None (also when it is damaged)."""
    side = table_path(target, name).with_suffix(".json")
    try:
        return json.loads(side.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def require_table(target: str, name: str, *, produced_by: str,
                  columns: list[str] | None = None) -> pd.DataFrame:
    """Read a table that an earlier chapter must have written (only `columns` when given); a clear error if it
    is missing or damaged."""
    path = table_path(target, name)
    if path.is_file() and table_meta(target, name) is not None:
        problem = table_problem(target, name)
        if problem:
            raise CacheError(
                f"{problem}. Rebuild it: make book TARGET={target} (the chapter {produced_by} is re-executed "
                f"because its tables no longer verify), or delete {path} and rerun."
            )
    df = load_table(target, name, columns=columns)
    if df is None:
        raise FileNotFoundError(
            f"the result table `{name}` for target `{target}` is missing ({path}). "
            f"Run the chapter {produced_by} first (make book TARGET={target} runs all chapters in order)."
        )
    return df


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def note_artifact(path: Path, sha256: str) -> None:
    """Note in the artefact log (when the book runner set `ARTIFACT_LOG`) that `path` was read or written with
    these bytes: a reused chapter is re-executed when one of its artefacts no longer matches."""
    log = os.environ.get(ARTIFACT_LOG)
    if log:
        with open(log, "a") as handle:  # one short line per call: appends do not interleave
            handle.write(json.dumps({"path": str(Path(path).resolve()), "sha256": sha256}) + "\n")


def read_artifact_log(log: Path) -> dict[str, str]:
    """{path: sha256} of the artefacts noted in `log` (the last note of a path wins)."""
    out = {}
    if Path(log).is_file():
        for line in Path(log).read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                out[entry["path"]] = entry["sha256"]
    return out


def stale_artifacts(artifacts: dict[str, str]) -> list[str]:
    """Paths among {path: sha256} that are missing or whose bytes changed."""
    return [p for p, digest in artifacts.items() if not Path(p).is_file() or file_sha256(Path(p)) != digest]


class Busy(RuntimeError):
    """Another process holds a lock this run needs; the message names the lock and that process."""


@contextmanager
def file_lock(path: Path, *, what: str, wait: bool, poll_s: float = 2.0) -> Iterator[None]:
    """Hold an exclusive lock on `path` (flock: released by the kernel when the holder dies, even by SIGKILL).

    wait=False raises `Busy` at once when another process holds it; wait=True prints one line and waits.
    """
    path = Path(path)
    _ensure_writable(path.parent)
    handle = open(path, "a+")
    try:
        told = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                if not wait:
                    raise Busy(f"{what} is in use by {holder} (lock {path}). Wait until that run ends, "
                               f"or stop it, then rerun.") from None
                if not told:
                    print(f"waiting: {what} is in use by {holder} (lock {path}) ...", flush=True)
                    told = True
                time.sleep(poll_s)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        yield
    finally:
        handle.close()  # closing drops the lock


@contextmanager
def set_aside(frames: dict[str, pd.DataFrame], target: str) -> Iterator[None]:
    """Hold `frames` on disk while the block runs: the dict is emptied, its tables written (Arrow IPC) to an
    unnamed file in the target's results folder (deleted when closed, and by the system if the process
    dies), and refilled with the tables read back when the block ends, as a cached table reads back (list
    columns Arrow-backed). For tables a step does not use while it holds much else: chapter 6 keeps its
    weights-only tables here through its held-out checks."""
    folder = results_dir(target)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(frames)
    with tempfile.TemporaryFile(dir=folder) as file:
        for name in names:  # one table converted at a time
            table = _arrow_table(frames.pop(name), preserve_index=None)
            with pa.ipc.new_stream(file, table.schema) as writer:
                writer.write_table(table)
            del table
        gc.collect()
        pa.default_memory_pool().release_unused()  # the conversions' buffers: else kept by the pool
        yield
        file.seek(0)
        source = pa.PythonFile(file, mode="r")
        for name in names:
            frames[name] = _pandas(pa.ipc.open_stream(source).read_all())


def progress(line: str) -> None:
    """Print a progress line (silenced by WEIGHTSCOPE_PROGRESS=0). Lines that start with a chapter's stem
    ("05_context_neurons: ...") reach the terminal while the book runs and are dropped from the page."""
    if progress_enabled():
        print(line, flush=True)


def cached_tables(target: str, names: list[str] | None, provenance: dict[str, Any], compute, *,
                  label: str | None = None) -> dict[str, pd.DataFrame]:
    """Tables made by one computation, cached together: the one caching helper every chapter uses.

    Returns {name: DataFrame} read back from `data/results/<target>/<name>.parquet` when each of `names`
    verifies and carries this run's key (the provenance, code and package versions); otherwise (or when
    `names` is None: not known before computing) compute() -> {name: DataFrame} runs and every table it
    returns is saved. A run killed between two writes leaves a set whose keys do not all match, so the next
    run recomputes it. `label` is printed as a progress line before the work.
    """
    key = cache_key(provenance=provenance)
    if names:
        found = {n: load_table(target, n, key=key) for n in names}
        if all(frame is not None for frame in found.values()):
            return found
    if label:
        progress(f"{label} ...")
    found = compute()
    for name, frame in found.items():
        save_table(frame, target, name, key=key, params=provenance)
    return found


def layer_tables(target: str, name: str, saes, provenance: dict[str, Any], compute) -> dict[str, pd.DataFrame]:
    """Per-SAE result tables, each cached under `<name>/layer_LL_<part>` through `cached_tables`: a rerun
    resumes at the first layer without a complete result, and a change of parameters, SAE or versions
    recomputes.

    saes: a sequence of `LoadedSAE`s; a lazy one with `ids` and `layers` (`load.sae_sequence.SAESequence`) is
    only indexed for the layers that must be computed, so a cached layer never loads its SAE.
    compute(sae) -> {part: DataFrame}. Returns {part: the parts of every layer, concatenated}.
    """
    out: dict[str, list[pd.DataFrame]] = {}
    for index in range(len(saes)):
        sae_id, layer = _sae_key(saes, index)
        stem = f"{name}/layer_{layer:02d}"
        marker = load_table(target, f"{stem}_parts")  # written last: lists the layer's parts
        names = [f"{stem}_{p}" for p in marker["part"]] + [f"{stem}_parts"] if marker is not None else None

        def compute_layer(index=index, stem=stem):
            sae = saes[index]
            frames = {f"{stem}_{part}": frame for part, frame in compute(sae).items()}
            return {**frames, f"{stem}_parts": pd.DataFrame({"part": [n[len(stem) + 1:] for n in frames]})}

        tables = cached_tables(target, names, {**provenance, "sae": sae_id, "layer": layer}, compute_layer,
                               label=f"{name}: layer {layer} (SAE {sae_id})")
        for table, frame in tables.items():
            if table != f"{stem}_parts":
                out.setdefault(table[len(stem) + 1:], []).append(frame)
    return {part: pd.concat(frames, ignore_index=True) for part, frames in out.items()}


def _sae_key(saes, index: int) -> tuple[str, int]:
    """(sae id, layer) of SAE `index`, without loading it when `saes` knows them (a lazy sequence)."""
    if hasattr(saes, "ids") and hasattr(saes, "layers"):
        return str(saes.ids[index]), int(saes.layers[index])
    sae = saes[index]
    return sae.sae_id, sae.layer
