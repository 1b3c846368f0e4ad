"""The benchmark harness: timing, peak memory, fresh-process workers, the environment record, discovery of
the benchmark files and the results file. The benchmarks themselves are `bench/bench_<name>.py`.

A benchmark file is either

* a **harness benchmark**: it defines `NAME` (its key in the results file and in `--only`), `PLANS`
  ({(device, quick): plan dict}: how much it measures per device and mode), `run(ctx) -> dict | list` (one
  measurement, every comparison made in that one run) and `table(result, report) -> str` (markdown of its
  result; report: the whole results file); optionally
  `QUICK = False` (left out of --quick runs), `ORDER` (a number: where it runs; default last) and
  `WORKERS` ({kind: function(spec) -> dict}, run in a fresh interpreter by `run_worker`); or
* a **standalone** script (`python bench/bench_<name>.py`), which `bench/run.py` lists and leaves alone.

Everything a benchmark measures goes through the library's public API; results are written atomically with
`weightscope.io.atomic_write_json`.
"""

from __future__ import annotations

import ast
import gc
import importlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
RUNNER = BENCH_DIR / "run.py"
_MARK = "BENCH-RESULT "


@dataclass
class Context:
    """What one benchmark's `run` gets: the device, the mode, its plan, and the shared run settings."""

    device: str
    quick: bool
    repeats: int
    plan: dict
    meta: dict  # device, device name, torch and transformers versions, command: copied into every result
    tmp: Path  # scratch folder, removed after the run
    options: dict = field(default_factory=dict)  # command-line options a benchmark reads (e.g. depth)


# ----------------------------------------------------------------------------------------------------------
# Benchmark files


def discover() -> tuple[list[ModuleType], list[str]]:
    """(harness benchmarks in run order, names of standalone bench_*.py files)."""
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))  # benchmark files import `harness` and each other by name
    modules, standalone = [], []
    for path in sorted(BENCH_DIR.glob("bench_*.py")):
        if _is_harness_benchmark(path):
            modules.append(importlib.import_module(path.stem))
        else:  # not imported: a script may do its work at import
            standalone.append(path.name)
    names = [m.NAME for m in modules]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SystemExit(f"bench: two benchmark files share the NAME {duplicates}; give each its own.")
    modules.sort(key=lambda m: (getattr(m, "ORDER", math.inf), m.NAME))
    return modules, standalone


def _is_harness_benchmark(path: Path) -> bool:
    """Whether a file defines NAME, PLANS, run and table at its top level (read, not imported)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    names |= {target.id for node in tree.body if isinstance(node, ast.Assign)
              for target in node.targets if isinstance(target, ast.Name)}
    return {"NAME", "PLANS", "run", "table"} <= names


def module_file(module: ModuleType) -> str:
    return Path(module.__file__).name


# ----------------------------------------------------------------------------------------------------------
# Timing and memory


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def time_runs(fn, *, repeats: int, device: str, warmup: int = 1) -> dict:
    """Seconds per call: median, min and every sample of `repeats` timed calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - start)
    return {"median_s": statistics.median(samples), "min_s": min(samples), "samples_s": samples,
            "repeats": repeats, "warmup": warmup}


def time_interleaved(fns: dict, *, repeats: int, device: str, warmup: int = 1) -> dict[str, dict]:
    """`time_runs` for several routes measured round-robin (the order rotating every round), so that drifts
    in the load of a shared machine hit every route alike; one result dict per route."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            fns[name]()
            sync(device)
            samples[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(xs), "min_s": min(xs), "samples_s": xs, "repeats": repeats,
                   "warmup": warmup, "interleaved_with": [n for n in names if n != name]}
            for name, xs in samples.items()}


def _proc_status(*keys: str) -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"{key}:\s+(\d+)", text).group(1)) * 1024 for key in keys}


class PeakMemory:
    """Peak memory of a block above its start: host RSS (Linux VmHWM, reset via clear_refs), and CUDA."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.cuda0 = torch.cuda.memory_allocated()
        self.rss0 = _proc_status("VmRSS")["VmRSS"]
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.method = "VmHWM after clear_refs"
        except OSError:
            self.method = "ru_maxrss (peak over the process's life)"
        return self

    def __exit__(self, *exc):
        import resource

        import torch

        status = _proc_status("VmHWM", "RssAnon", "RssFile")
        if self.method.startswith("VmHWM"):
            peak = status["VmHWM"]
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.result = {"rss_before_bytes": self.rss0, "rss_peak_bytes": peak,
                       "rss_peak_delta_bytes": peak - self.rss0, "rss_method": self.method,
                       "rss_anon_end_bytes": status["RssAnon"], "rss_file_end_bytes": status["RssFile"]}
        if self.device == "cuda":
            torch.cuda.synchronize()
            peak_cuda = torch.cuda.max_memory_allocated()
            self.result.update(cuda_before_bytes=self.cuda0, cuda_peak_bytes=peak_cuda,
                               cuda_peak_delta_bytes=peak_cuda - self.cuda0)
        return False


def peak_key(device: str) -> str:
    """The peak-memory field a comparison on this device reads."""
    return "cuda_peak_delta_bytes" if device == "cuda" else "rss_peak_delta_bytes"


def release(device: str) -> None:
    """Free what the last measurement left behind before the next one."""
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------
# Inputs


def randn(shape, *, seed: int, device: str, scale: float = 1.0, dtype=None):
    """Gaussian tensor generated on CPU in row blocks (no transient copy), then moved to the device."""
    import torch

    out = torch.empty(shape, dtype=dtype or torch.float32)
    generator = torch.Generator().manual_seed(seed)
    rows = max(1, (64 << 20) // (4 * max(1, math.prod(shape[1:]))))
    for start in range(0, shape[0], rows):
        block = out[start : start + rows]
        block.copy_(torch.randn(block.shape, generator=generator).mul_(scale))
    return out.to(device)


# ----------------------------------------------------------------------------------------------------------
# Fresh-process workers


def run_worker(module: ModuleType, kind: str, spec: dict) -> dict:
    """Run module.WORKERS[kind](spec) in a fresh interpreter; the result comes back as a marked JSON line."""
    path = os.pathsep.join(filter(None, [str(REPO / "lib"), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(RUNNER), "--worker", module_file(module), kind, json.dumps(spec)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path})
    for line in proc.stdout.splitlines():
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    raise RuntimeError(f"bench worker {module_file(module)}:{kind} failed (exit {proc.returncode}):\n"
                       f"{proc.stderr[-3000:]}")


def serve_worker(file_name: str, kind: str, spec: str) -> None:
    """The worker side of `run_worker`: run one function and print its result as the marked line."""
    modules, _ = discover()
    module = next(m for m in modules if module_file(m) == file_name)
    print(_MARK + json.dumps(module.WORKERS[kind](json.loads(spec))), flush=True)


# ----------------------------------------------------------------------------------------------------------
# Environment, progress, results


def environment(device: str) -> dict:
    import safetensors
    import torch
    import transformers

    name = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    try:
        import psutil

        memory = psutil.virtual_memory().total
    except ImportError:
        memory = None
    return {
        "device": device, "device_name": name, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "memory_total_bytes": memory,
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "transformers": transformers.__version__, "safetensors": safetensors.__version__,
        "cuda": torch.version.cuda if device == "cuda" else None, "cpu_capability": cpu_capability(),
    }


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), e.g. "AMD EPYC"."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or "unknown CPU")


def cpu_capability() -> str:
    """The vector instructions torch's CPU kernels use here ("AVX2", "AVX512", ...): the same code runs at
    rates several times apart on two 2-core machines that differ in it."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_results(path: Path, report: dict) -> None:
    from weightscope.io import atomic_write_json

    atomic_write_json(path, report)


def ms(timing: dict) -> str:
    return f"{timing['median_s'] * 1e3:.1f} ms"


def gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB" if x >= 1e8 else f"{x / 1e6:.1f} MB"


def header(report: dict) -> str:
    """The line above a results file's tables: device, versions, mode, load, command."""
    env = report["environment"]
    return (f"Device: {env['device_name']} ({env['device']}, {env['torch_threads']} torch threads); "
            f"torch {env['torch']}, transformers {env['transformers']}; {report['mode']} run, medians of "
            f"{report['repeats']} runs; load average {report['load_average_start'][0]:.1f} at the start, "
            f"{report['load_average_end'][0]:.1f} at the end; `{report['command']}`\n")
