#!/usr/bin/env python
"""weightscope benchmarks: the chapters' kernels and the streaming loader, side by side with the plain
operations they replace, in one run on one device.

    .venv/bin/python bench/run.py [--quick] [--device cpu|cuda] [--only kernel,memory]     (or: make bench)

Each benchmark is one file, `bench/bench_<name>.py` (what it compares is in its docstring; `--list` prints
them); `bench/harness.py` holds the timing, peak-memory and subprocess helpers they share. Timings are
medians over --repeats runs after one warm-up (time.perf_counter; torch.cuda.synchronize on GPU). Ratios
matter more than absolute numbers on a shared machine: every comparison is measured in the same run.
Results go to bench/results/<device>-<date>[-quick].json, written atomically after each benchmark
(`"complete": false` until the last; a benchmark that fails is recorded under `errors` and the rest run on);
`bench/run.py --table FILE` prints a results file as markdown tables.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import sys
import tempfile
import textwrap
import time
import traceback
from pathlib import Path

import harness

SCHEMA = 2  # 2: "plan" holds one plan per benchmark (1: one flat plan); the results are the same


def parse_args(argv, names: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller subsets, fewer repeats, no loading")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (5; quick 3)")
    parser.add_argument("--only", default=",".join(names), help=f"comma-separated, of: {', '.join(names)}")
    parser.add_argument("--depth", type=int, default=4, help="blocks in the loading checkpoint")
    parser.add_argument("--load-repeats", type=int, default=None, help="fresh-process loads per loader")
    parser.add_argument("--memory-features", type=int, default=None, help="features in the memory comparison")
    parser.add_argument("--kernel-threads", default=None,
                        help="comma-separated torch thread counts for the kernel benchmark (default: torch's "
                             "default, plus 1 on a multi-core CPU in a full run)")
    parser.add_argument("--tmpdir", default=None, help="where to write temporary matrices and the checkpoint")
    parser.add_argument("--out", default=None, help="results file (default bench/results/<device>-<date>"
                                                    "[-quick].json)")
    parser.add_argument("--table", metavar="FILE", help="print a results file as markdown tables and exit")
    parser.add_argument("--list", action="store_true", help="list the benchmark files and exit")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only.split(",")) - set(names))
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {unknown}; known: {', '.join(names)}")
    return args


def tables(report: dict, modules=None) -> str:
    """Markdown tables of a results dict (schema 1 or 2), one per benchmark it holds."""
    modules = modules if modules is not None else harness.discover()[0]
    by_name = {m.NAME: m for m in modules}
    parts = [harness.header(report)]
    for name, result in report["results"].items():
        module = by_name.get(name)
        parts.append(module.table(result, report) if module else f"({name}: no benchmark file renders it)\n")
    parts += [f"**{name}: failed** ({error})\n" for name, error in report.get("errors", {}).items()]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    modules, standalone = harness.discover()
    args = parse_args(argv, [m.NAME for m in modules])
    if args.worker:
        harness.serve_worker(*args.worker)
        return 0
    if args.list:
        for m in modules:
            print(f"{m.NAME:12s} {harness.module_file(m):24s} {textwrap.shorten(m.__doc__, 70)}")
        for name in standalone:
            print(f"{'(standalone)':12s} {name:24s} run it directly: .venv/bin/python bench/{name}")
        return 0
    if args.table:
        print(tables(json.loads(Path(args.table).read_text()), modules))
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is available here; run on a GPU machine or use "
              "--device cpu.", file=sys.stderr)
        return 2
    only = args.only.split(",")
    selected = [m for m in modules if m.NAME in only and not (args.quick and not getattr(m, "QUICK", True))]
    repeats = args.repeats or (3 if args.quick else 5)
    started = dt.datetime.now(dt.timezone.utc)
    env = harness.environment(args.device)
    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    meta = {"device": args.device, "device_name": env["device_name"], "dtype": "float32",
            "torch": env["torch"], "transformers": env["transformers"], "command": command}
    out_path = Path(args.out) if args.out else harness.RESULTS_DIR / (
        f"{args.device}-{started.date().isoformat()}{'-quick' if args.quick else ''}.json")
    plans = {m.NAME: m.PLANS[(args.device, args.quick)] for m in selected}
    options = {"depth": args.depth, "load_repeats": args.load_repeats,  # overrides of the plans
               "memory_features": args.memory_features, "kernel_threads": args.kernel_threads}
    report = {"schema": SCHEMA, "command": command, "cwd": os.getcwd(),
              "mode": "quick" if args.quick else "full",
              "started_utc": started.isoformat(timespec="seconds"), "environment": env, "repeats": repeats,
              "plan": plans, "options": options, "load_average_start": os.getloadavg(), "results": {}}
    harness.log(f"{env['device_name']} ({env['torch_threads']} torch threads), torch {env['torch']}; "
                f"mode {report['mode']}; benchmarks: {', '.join(m.NAME for m in selected)}")
    if standalone:
        harness.log(f"standalone, not run here: {', '.join(standalone)}")
    tmp = Path(tempfile.mkdtemp(prefix="weightscope-bench-", dir=args.tmpdir))
    t0 = time.perf_counter()
    report["errors"] = {}
    try:
        for module in selected:
            ctx = harness.Context(device=args.device, quick=args.quick, repeats=repeats,
                                  plan=plans[module.NAME], meta=meta, tmp=tmp, options=options)
            try:
                with torch.inference_mode():
                    report["results"][module.NAME] = module.run(ctx)
            except Exception as exc:  # one broken benchmark must not take the others' results with it
                traceback.print_exc()
                report["errors"][module.NAME] = f"{type(exc).__name__}: {exc}"
                harness.log(f"{module.NAME}: failed ({report['errors'][module.NAME]})")
            # rewritten after each benchmark: an interrupted run keeps what it measured
            harness.write_results(out_path, {**report, "complete": False})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["wall_s"] = time.perf_counter() - t0
    report["load_average_end"] = os.getloadavg()
    report["finished_utc"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    report["complete"] = True
    harness.write_results(out_path, report)
    harness.log(f"wrote {out_path} ({report['wall_s']:.0f} s)")
    print(tables(report, modules))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
