"""The weights-only atlas: chapters 1 and 2's measurements for many SAEs, one Ray task per SAE.

    python -m weightscope.publish.atlas [LIST.yaml] [--address HOST:PORT] [--workers N] [--dry-run] [--keep]

LIST names SAEs (default: `atlas_default.yaml`, the residual releases of the installed sae-lens):

    saes:
      - release: gpt2-small-res-jb           # a sae-lens release; `ids`: an optional regex over its ids
        ids: "blocks\\.[0-5]\\..*"
      - folder: path/to/saes                 # a sae-lens folder (one SAE, or a folder of them)
        model: stories260K                   # the model it reads (local folders only; releases record it)
      - folder: demo                         # the project's demo SAEs

Every SAE is measured by the chapters' own functions (`output_tokens.analyse_one`, `attention.sae_reads`),
by a Ray actor per model that loads the model's weights-only tensors once and streams its SAEs one at a
time. Each result is written as soon as it arrives, keyed by the SAE's identity (source, id, checksum of its weights file
where local) and the measurement's parameters, with the checksum of the result file: a killed run resumes at
the first SAE without a verified result, a second run recomputes nothing. A failure is a row with its reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from weightscope import io
from weightscope.chapters import attention as ch2
from weightscope.chapters import output_tokens as ch1
from weightscope.compute.attention import reads_summary
from weightscope.config.params import PROCESSING_FLAGS
from weightscope.config.paths import progress_enabled, results_dir

DEFAULT_LIST = Path(__file__).with_name("atlas_default.yaml")
TARGET = "atlas"  # the atlas's tables live in data/results/atlas/
FLOP_RATE_CPU = 5e10  # fallback FLOP/s for the dry run's estimate when no benchmark result exists
ASSUMED_WIDTH = 16384  # the dry run's width where neither the SAE's id nor a local cfg.json gives one
GPU_FLOP_RATE = 2e14  # a modern GPU's dense float32/TF32 rate, for the dry run's per-device estimate


class AtlasInputError(ValueError):
    """The SAE list or the cluster cannot be used; one message, exit 2, before any task starts."""


@dataclass(frozen=True)
class Job:
    """One SAE to measure: where it comes from, and the model it reads."""

    source: str  # a sae-lens release, "demo", or a folder
    sae_id: str | None  # id in the release, or subfolder name; None for a folder holding one SAE
    model: str  # the model name the weights-only loader takes
    d_sae: int | None = None  # width, when known before loading (folders: cfg.json)
    weights_sha: str | None = None  # sha256 of a local SAE's weights file

    def identity(self) -> dict:
        return {"source": self.source, "sae_id": self.sae_id, "model": self.model, "sha": self.weights_sha}


# ------------------------------------------------------------------------------------------------------------
# The list


def read_list(path: Path) -> list[dict]:
    import yaml

    if not Path(path).is_file():
        raise AtlasInputError(f"SAE list {path} does not exist.")
    data = yaml.safe_load(Path(path).read_text()) or {}
    entries = data.get("saes") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise AtlasInputError(f"{path}: expected a non-empty list under `saes:` (see the module docstring).")
    return entries


def expand(entries: list[dict]) -> list[Job]:
    """Every SAE the entries name, all problems gathered into one `AtlasInputError`."""
    jobs, problems = [], []
    for entry in entries:
        try:
            jobs += _expand_one(entry)
        except AtlasInputError as exc:
            problems.append(str(exc))
    if problems:
        raise AtlasInputError("; ".join(problems))
    return jobs


def _expand_one(entry: dict) -> list[Job]:
    if not isinstance(entry, dict) or ("release" in entry) == ("folder" in entry):
        raise AtlasInputError(f"entry {entry!r}: give exactly one of `release:` or `folder:`")
    pattern = entry.get("ids")
    try:
        regex = re.compile(pattern) if pattern else None
    except re.error as exc:
        raise AtlasInputError(f"entry {entry!r}: `ids` is not a regular expression ({exc})") from None
    if "release" in entry:
        return _release_jobs(str(entry["release"]), regex, pattern)
    return _folder_jobs(str(entry["folder"]), entry.get("model"), regex, pattern)


def _release_jobs(release: str, regex, pattern) -> list[Job]:
    import difflib

    from weightscope.load.saes import pretrained_directory

    directory = pretrained_directory()
    if release not in directory:
        close = difflib.get_close_matches(release, list(directory), n=3, cutoff=0.5)
        hint = f" (close: {close})" if close else ""
        raise AtlasInputError(f"unknown sae-lens release {release!r}{hint}")
    lookup = directory[release]
    ids = [i for i in lookup.saes_map if regex is None or regex.search(i)]
    if not ids:
        raise AtlasInputError(f"release {release!r}: the regex {pattern!r} matches none of its "
                              f"{len(lookup.saes_map)} ids (e.g. {list(lookup.saes_map)[:3]})")
    return [Job(release, i, str(lookup.model), d_sae=_width_from_id(i)) for i in ids]


def _width_from_id(sae_id: str) -> int | None:
    m = re.search(r"width_(\d+)([km])", sae_id)
    return int(m.group(1)) * {"k": 1024, "m": 1024 ** 2}[m.group(2)] if m else None


def _folder_jobs(folder: str, model: str | None, regex, pattern) -> list[Job]:
    from weightscope.load.saes import SAE_FILES, demo_sae_folder

    root = demo_sae_folder() if folder == "demo" else Path(folder).expanduser()
    model = model or ("stories260K" if folder == "demo" else None)
    if not model:
        raise AtlasInputError(f"folder {folder}: name the model its SAEs read (`model:`)")
    if not root.is_dir():
        raise AtlasInputError(f"folder {folder} does not exist")
    is_sae = lambda p: all((p / f).is_file() for f in SAE_FILES)  # noqa: E731
    if is_sae(root):
        found = [(None, root)]
    else:
        found = [(p.name, p) for p in sorted(root.iterdir()) if p.is_dir() and is_sae(p)]
    if not found:
        raise AtlasInputError(f"folder {folder} holds no sae-lens SAE ({' + '.join(SAE_FILES)}, "
                              "or subfolders with them)")
    found = [(n, p) for n, p in found if regex is None or n is None or regex.search(n)]
    if not found:
        raise AtlasInputError(f"folder {folder}: the regex {pattern!r} matches none of its SAE folders")
    source = "demo" if folder == "demo" else str(root)
    return [Job(source, name, model, d_sae=json.loads((p / "cfg.json").read_text()).get("d_sae"),
                weights_sha=io.file_sha256(p / "sae_weights.safetensors")) for name, p in found]


# ------------------------------------------------------------------------------------------------------------
# One SAE


def measure(model, sae, c1: ch1.Config, c2: ch2.Config, *, vocab, keep, dtype,
            device) -> dict[str, pd.DataFrame]:
    """Chapters 1 and 2 on one SAE, by the chapters' functions: {"features", "nulls", "heads", "profiles"}
    (chapter 2's per-head summary and per-feature profiles: like chapter 2, the long reads table is not kept)."""
    tabs = ch1.analyse_one(sae, model, c1, vocab=vocab, keep=keep, dtype=dtype)
    _, reads = ch2.sae_reads(model, sae, c2, dtype=dtype, device=device)
    return {"features": tabs["features"], "nulls": tabs["nulls"], "heads": reads_summary(reads),
            "profiles": ch2.feature_profiles(reads)}


def summary_row(tabs: dict[str, pd.DataFrame], c2: ch2.Config) -> dict:
    """The summary columns of one SAE: predicting rate per side with its nulls and 95% interval (chapter 1's
    `rates`), attention participation per side against both nulls (chapter 2's `participation`)."""
    row = {}
    rates = ch1.rates(tabs["features"], tabs["nulls"])
    n = int((tabs["features"]["population"] == "SAE features").sum())
    for side in rates["side"].unique():
        r = rates[rates["side"] == side].groupby("population")["fraction"].mean()
        p = float(r["SAE features"])
        name = side.split()[0]
        row[f"{name}_rate"] = p
        row[f"{name}_lo"], row[f"{name}_hi"] = wilson(p, n)
        row[f"{name}_null_random"] = float(r["null: random"])
        row[f"{name}_null_shuffled"] = float(r["null: shuffled"])
    for r in ch2.participation(tabs["heads"], c2).itertuples():
        key = f"attn_{r.side.split()[0]}_{'iso' if r.null == 'isotropic' else 'cov'}"
        row[key], row["attn_chance"] = r.rate, r.chance
    row["n_features"] = n
    return row


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson 95% interval of a rate p observed over n trials."""
    if n <= 0:
        return math.nan, math.nan
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


class ModelWorker:
    """Holds one model's weights-only tensors (loaded once) and measures its SAEs one at a time."""

    def __init__(self, model_name: str, c1: ch1.Config, c2: ch2.Config, device: str = "cpu"):
        import torch

        from weightscope.compute import lens
        from weightscope.load.weights_model import load_weights_model

        self.device = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available()
                                                                     else "cpu"))
        self.dtype = torch.float32
        self.model = load_weights_model(model_name, device=self.device, dtype=self.dtype, progress=False)
        self.processing: dict | None = None  # the processing applied, set by the first SAE
        self.c1, self.c2 = c1, c2
        self.vocab = lens.token_strings(self.model)
        self.keep = lens.content_ids(self.model, c1.exclude_tokens)

    def run(self, job: Job) -> dict:
        """{"status", "reason", "row", "tables"} for one SAE; a failure is a status, never an exception."""
        start = time.time()
        try:
            tables, row = self._measure(job)
            status, reason = "done", ""
        except Exception as exc:  # recorded with its reason; the run goes on
            tables, row = {}, {}
            status, reason = _classify(exc)
        row = {**row, "seconds": time.time() - start}
        return {"status": status, "reason": reason, "row": row, "tables": tables}

    def _measure(self, job: Job):
        import torch

        with torch.no_grad():  # not set globally: a worker may share its process with training code
            return self._measure_weights(job)

    def _measure_weights(self, job: Job):
        from weightscope.load.saes import check_fits, load_saes, require_residual
        from weightscope.load.weights_model import apply_processing

        sae = load_saes(job.source, [job.sae_id] if job.sae_id else None, device=str(self.device))[0]
        require_residual(sae)
        check_fits(sae, self.model)
        flags = {k: bool(v) for k, v in (sae.model_from_pretrained_kwargs or {}).items() if k in PROCESSING_FLAGS}
        if self.processing is None:
            apply_processing(self.model, flags)
            self.processing = flags
        elif flags != self.processing:
            raise Skip(f"trained with processing {flags}, this worker's model has {self.processing}")
        tables = measure(self.model, sae, self.c1, self.c2, vocab=self.vocab, keep=self.keep,
                         dtype=self.dtype, device=self.device)
        row = {"layer": sae.layer, "hook": sae.hook_name, "width": sae.d_sae, "d_model": sae.d_in,
               "architecture": sae.architecture, "l0": _published_l0(job) or sae.metadata.get("l0"),
               "processing": json.dumps(flags),
               **summary_row(tables, self.c2)}
        return tables, row


class Skip(Exception):
    """An SAE the atlas does not apply to (not residual, processing differs); recorded as skipped."""


def _classify(exc: Exception) -> tuple[str, str]:
    from weightscope.load.saes import SAEError

    text = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    if isinstance(exc, Skip) or (isinstance(exc, SAEError) and "residual" in str(exc)):
        return "skipped", text
    if "out of memory" in str(exc).lower():
        return "failed", "out of memory: " + text
    return "failed", text


def _published_l0(job: Job) -> float | None:
    """The L0 sae-lens's directory records for a release SAE, else None."""
    if job.weights_sha is not None:
        return None
    try:
        from weightscope.load.saes import pretrained_directory

        l0s = getattr(pretrained_directory()[job.source], "expected_l0", None) or {}
        value = l0s.get(job.sae_id)
        return float(value) if value is not None else None
    except Exception:
        return None


# ------------------------------------------------------------------------------------------------------------
# Results on disk


def result_key(job: Job, c1: ch1.Config, c2: ch2.Config) -> str:
    return io.cache_key(sae=job.identity(), ch1=dataclasses.asdict(c1), ch2=dataclasses.asdict(c2))


def atlas_dir() -> Path:
    """data/results/atlas, or the folder `WEIGHTSCOPE_ATLAS_DIR` names (tests, several lists side by side)."""
    return Path(os.environ.get("WEIGHTSCOPE_ATLAS_DIR") or results_dir(TARGET))


def _paths(key: str) -> tuple[Path, Path]:
    base = atlas_dir() / "saes"
    return base / f"{key}.parquet", base / f"{key}.json"


def load_result(key: str) -> dict | None:
    """A stored result whose file matches its recorded checksum, else None (absent, partial or altered)."""
    table, meta = _paths(key)
    if not meta.is_file():
        return None
    record = json.loads(meta.read_text())
    if record["status"] == "done" and (not table.is_file() or io.file_sha256(table) != record["sha256"]):
        return None
    return record


def save_result(key: str, job: Job, result: dict) -> dict:
    """The per-SAE tables (one tidy table, a `table` column naming chapter 1's features/nulls or chapter 2's
    heads/profiles), then the record with the table's checksum: the record is the proof of a finished result."""
    table, meta = _paths(key)
    record = {"key": key, **_job_columns(job), "status": result["status"], "reason": result["reason"],
              **result["row"], "versions": json.dumps(io.versions())}
    if result["status"] == "done":
        tidy = pd.concat([t.assign(table=name) for name, t in result["tables"].items()], ignore_index=True)
        io.atomic_write_bytes(table, tidy.to_parquet(index=False))
        record["sha256"] = io.file_sha256(table)
    io.atomic_write_json(meta, record)
    return record


def _job_columns(job: Job) -> dict:
    return {"release": job.source, "sae_id": job.sae_id, "model": job.model}


def write_summary(records: list[dict]) -> pd.DataFrame:
    summary = pd.DataFrame(records)
    io.atomic_write_bytes(atlas_dir() / "summary.csv", summary.to_csv(index=False).encode())
    return summary


# ------------------------------------------------------------------------------------------------------------
# The fan-out


def plan(jobs: list[Job], sizes: dict[tuple[str, str], int] | None = None) -> pd.DataFrame:
    """Per model: SAEs, bytes to download, FLOP, estimated seconds per device.

    Bytes: a local SAE downloads nothing; a release's SAE counts its files' sizes on the hub where `sizes`
    ({(release, sae_id): bytes}, `hub_sizes`) has them, else two float32 [d_sae, d_model] matrices (the
    `sized_from_hub` column counts the first kind)."""
    sizes = sizes or {}
    rows = []
    for job in jobs:
        d_sae = job.d_sae or ASSUMED_WIDTH
        d_model, d_vocab = _model_dims(job.model)
        flop = 2 * 2 * d_sae * d_model * d_vocab  # decoder and encoder sides against the (un)embedding
        local = job.weights_sha is not None
        hub = sizes.get((job.source, job.sae_id))
        nbytes = 0 if local else hub if hub is not None else 2 * 4 * d_sae * d_model
        rows.append({"model": job.model, "saes": 1, "bytes": nbytes, "sized_from_hub": hub is not None,
                     "flop": flop, "local": local})
    df = pd.DataFrame(rows).groupby("model", as_index=False).sum(numeric_only=True)
    df["cpu_s"] = df["flop"] / FLOP_RATE_CPU
    df["gpu_s"] = df["flop"] / GPU_FLOP_RATE
    return df


def hub_sizes(jobs: list[Job], api=None) -> dict[tuple[str, str], int]:
    """{(release, sae_id): bytes of the SAE's files on the hub} for the release jobs whose repository the hub
    lists (one listing per repository); {} offline (`HF_HUB_OFFLINE=1`) or where the hub does not answer."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return {}
    from weightscope.load.saes import pretrained_directory

    directory = pretrained_directory()
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    listings, out = {}, {}
    for job in jobs:
        lookup = directory.get(job.source) if job.weights_sha is None else None
        if lookup is None or job.sae_id not in lookup.saes_map:
            continue
        if lookup.repo_id not in listings:
            try:
                info = api.model_info(lookup.repo_id, files_metadata=True, timeout=10)
                listings[lookup.repo_id] = {f.rfilename: f.size or 0 for f in info.siblings or []}
            except Exception:  # noqa: BLE001 - unreachable, gated, renamed: the widths give the estimate
                listings[lookup.repo_id] = None
        files, path = listings[lookup.repo_id], lookup.saes_map[job.sae_id].strip("/")
        size = sum(v for k, v in (files or {}).items() if k == path or k.startswith(path + "/"))
        if size:
            out[(job.source, job.sae_id)] = size
    return out


_KNOWN_DIMS = {"gemma-2-2b": (2304, 256000), "gemma-2-9b": (3584, 256000), "gpt2-small": (768, 50257),
               "pythia-70m-deduped": (512, 50304), "meta-llama/Llama-3.1-8B": (4096, 128256),
               "stories260K": (64, 512)}


def _model_dims(model: str) -> tuple[int, int]:
    return _KNOWN_DIMS.get(model, (2048, 50000))


def run_atlas(jobs: list[Job], *, c1: ch1.Config, c2: ch2.Config, workers: int = 1,
              address: str | None = None, device: str = "cpu", log=print) -> pd.DataFrame:
    """Measure every job without a verified result on Ray; returns the summary (all jobs, old and new)."""
    records, todo = {}, []
    for job in jobs:
        key = result_key(job, c1, c2)
        done = load_result(key)
        if done is not None:
            records[key] = done
        else:
            todo.append((key, job))
    log(f"atlas: {len(jobs)} SAEs, {len(records)} with a verified result, {len(todo)} to measure")
    if todo:
        _fan_out(todo, records, c1=c1, c2=c2, workers=workers, address=address, device=device, log=log)
    return write_summary([records[result_key(j, c1, c2)] for j in jobs if result_key(j, c1, c2) in records])


def connect(address: str | None, workers: int):
    """`ray.init` locally (with `workers` CPUs) or on the cluster at `address`; AtlasInputError if refused."""
    import ray

    if ray.is_initialized():
        return ray
    if address and address != "auto":
        _check_reachable(address)
    # the raylet waits a fixed time for its agents' ports; on a loaded machine they start late
    os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")
    for attempt in range(3):  # a local raylet on a busy machine can miss Ray's fixed 30 s start-up window
        try:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
            return ray
        except Exception as exc:
            ray.shutdown()
            if address or attempt == 2:
                where = f"the Ray cluster at {address}" if address else "a local Ray"
                raise AtlasInputError(f"cannot start or reach {where} ({type(exc).__name__}: "
                                      f"{str(exc).splitlines()[0]})") from None
            print(f"atlas: local Ray did not start in time ({attempt + 1}/3); trying again", flush=True)


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A plain TCP connection to the cluster's head (Ray itself retries for minutes before giving up)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise AtlasInputError(f"--address {address!r}: expected HOST:PORT, e.g. 10.0.0.5:6379")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise AtlasInputError(f"cannot reach the Ray cluster at {address} ({exc}); start it with "
                              "`ray start --head` there (see the README)") from None


def _fan_out(todo, records, *, c1, c2, workers, address, device, log):
    ray = connect(address, workers)
    gpus = ray.cluster_resources().get("GPU", 0)
    by_model: dict[str, list] = {}
    for key, job in todo:
        by_model.setdefault(job.model, []).append((key, job))
    Worker = ray.remote(ModelWorker)
    pending, start = {}, time.time()
    for model, items in by_model.items():
        share = gpu_share(max((j.d_sae or 0) for _, j in items), *_model_dims(model)) if gpus else 0
        where = "cuda" if share else device
        actors = [Worker.options(num_cpus=1, num_gpus=share).remote(model, c1, c2, where)
                  for _ in range(max(1, min(workers, len(items))))]
        for i, (key, job) in enumerate(items):  # each actor streams its SAEs one at a time
            pending[actors[i % len(actors)].run.remote(job)] = (key, job)
    total, done = len(pending), 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        key, job = pending.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except Exception as exc:  # the worker itself died (model not loadable, killed): recorded, go on
            result = {"status": "failed", "reason": f"worker: {type(exc).__name__}: "
                      f"{str(exc).splitlines()[-1][:300]}", "row": {}, "tables": {}}
        records[key] = save_result(key, job, result)
        done += 1
        if progress_enabled():
            left = (time.time() - start) / done * (total - done)
            log(f"  [{done}/{total}] {job.model} {job.source}:{job.sae_id} {result['status']} "
                f"{result['reason'][:80]} (about {left:.0f} s left)".rstrip())


def gpu_share(d_sae: int, d_model: int, d_vocab: int, gpu_bytes: float = 80e9) -> float:
    """The share of one GPU an SAE's measurement needs: its matrices and the [d_sae, d_vocab] score chunk
    streamed against the vocabulary, rounded up to a tenth, at most one whole GPU."""
    need = 4 * (2 * d_sae * d_model + d_vocab * d_model) + 4 * min(d_sae, 4096) * d_vocab * 2
    return min(1.0, math.ceil(10 * need / gpu_bytes) / 10)


# ------------------------------------------------------------------------------------------------------------
# Command line


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m weightscope.publish.atlas",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("list", nargs="?", default=str(DEFAULT_LIST), help="YAML list of SAEs (default: shipped)")
    ap.add_argument("--address", help="join the Ray cluster at HOST:PORT (default: a local Ray)")
    ap.add_argument("--workers", type=int, default=1, help="workers (actors) per model; local CPUs")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--dry-run", action="store_true", help="print SAEs, models, bytes and time, then stop")
    ap.add_argument("--keep", action="store_true", help="keep downloaded SAEs (default: deleted after use)")
    ap.add_argument("--max-features", type=int, default=0, help="chapters' max_features (0: all)")
    ap.add_argument("--n-null", type=int, default=2048, help="null directions (chapter 1 and 2)")
    args = ap.parse_args(argv)
    try:
        if args.workers < 1:
            raise AtlasInputError(f"--workers {args.workers}: use at least 1")
        jobs = expand(read_list(Path(args.list)))
        c1 = ch1.Config(max_features=args.max_features, n_null=args.n_null)
        c2 = ch2.Config(max_features=args.max_features, n_null=args.n_null)
        if args.dry_run:
            print(f"atlas: {len(jobs)} SAEs over {len({j.model for j in jobs})} models")
            print(plan(jobs, hub_sizes(jobs)).to_string(index=False))
            return 0
        if args.address:
            connect(args.address, args.workers)  # an unreachable cluster is refused before any task
    except Exception as exc:
        if not isinstance(exc, (AtlasInputError, ValueError)):
            raise
        print(f"atlas: {exc}", file=sys.stderr)
        return 2
    try:
        summary = run_atlas(jobs, c1=c1, c2=c2, workers=args.workers, address=args.address,
                            device=args.device)
    except AtlasInputError as exc:  # Ray would not start here: nothing ran, finished results are kept
        print(f"atlas: {exc}", file=sys.stderr)
        return 3
    if not args.keep:
        _clear_downloads(jobs)
    counts = summary["status"].value_counts().to_dict() if len(summary) else {}
    print(f"atlas: {len(summary)} SAEs in {atlas_dir() / 'summary.csv'}: {counts}")
    return 0


def _clear_downloads(jobs: list[Job]) -> None:
    """Delete the hub downloads of release SAEs (local folders are never touched)."""
    releases = {j.source for j in jobs if j.weights_sha is None and j.source != "demo"}
    if not releases:
        return
    try:
        from huggingface_hub import scan_cache_dir

        from weightscope.load.saes import pretrained_directory

        repos = {pretrained_directory()[r].repo_id for r in releases}
        info = scan_cache_dir()
        hashes = [rev.commit_hash for repo in info.repos if repo.repo_id in repos for rev in repo.revisions]
        if hashes:
            info.delete_revisions(*hashes).execute()
    except Exception as exc:  # nothing downloaded, or no hub cache: nothing to delete
        print(f"atlas: downloads not deleted ({type(exc).__name__}: {exc})", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
