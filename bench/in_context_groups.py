"""Chapter 7 with its SAEs held in groups: the chapter's peak memory and CPU time at several `sae_memory_mb`,
each in a fresh process, and its tables at each budget compared with the first budget's.

    WEIGHTSCOPE_DATA=DIR/data python bench/in_context_groups.py PARAMS --budgets 2048 512 [--out FILE]

PARAMS names a target whose chapter 1-3 tables are in WEIGHTSCOPE_DATA (`bench_book.py --work DIR` leaves them
in DIR/data). Each budget runs `in_context.run(ctx, Config(sae_memory_mb=budget))`, the other settings at
their defaults, in a fresh process; the chapter's cache is keyed by the budget, so every run computes (and
leaves its tables as the chapter's cache). Per budget: the SAE groups, CPU seconds (user + system), wall
seconds and peak resident set (VmHWM: the imports and the model included).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def one(params: str, budget: float, dump: Path) -> dict:
    """Run the chapter once in this process; write its tables to `dump`; return the measurements."""
    from weightscope.chapters import in_context
    from weightscope.chapters.context import open_chapter

    t0, c0 = time.perf_counter(), time.process_time()
    ctx = open_chapter(params)
    tables = in_context.run(ctx, in_context.Config(sae_memory_mb=budget))
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    dump.mkdir(parents=True, exist_ok=True)
    for field in dataclasses.fields(tables):
        if field.name not in ("text", "config"):  # the text table counts the groups: it differs by design
            getattr(tables, field.name).to_parquet(dump / f"{field.name}.parquet")
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    return {"sae_memory_mb": budget, "sae_groups": int(tables.text["SAE groups"].iloc[0]),
            "cpu_s": round(cpu, 1), "wall_s": round(wall, 1), "peak_rss_gb": round(hwm * 1024 / 1e9, 2)}


def differences(a: Path, b: Path) -> dict[str, str]:
    """Per table: "equal", or what `pandas.testing.assert_frame_equal` says differs."""
    import pandas as pd

    out = {}
    for path in sorted(a.glob("*.parquet")):
        try:
            pd.testing.assert_frame_equal(pd.read_parquet(path), pd.read_parquet(b / path.name))
            out[path.stem] = "equal"
        except AssertionError as err:
            out[path.stem] = " ".join(str(err).split())[:300]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("params", help="params file (or name) whose chapter 1-3 tables are present")
    ap.add_argument("--budgets", type=float, nargs="+", default=[2048.0, 512.0], help="sae_memory_mb values")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default: bench/results/...)")
    ap.add_argument("--one", type=float, default=None, help=argparse.SUPPRESS)  # a child: one budget
    ap.add_argument("--dump", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.params, args.one, args.dump)))
        return
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, budget in enumerate(args.budgets):
            print(f"[groups] sae_memory_mb = {budget:g}: running chapter 7 in a fresh process", flush=True)
            proc = subprocess.run([sys.executable, __file__, args.params, "--one", str(budget),
                                   "--dump", str(Path(tmp) / str(i))], capture_output=True, text=True,
                                  env={**os.environ, "WEIGHTSCOPE_PROGRESS": "0"})
            if proc.returncode:
                sys.exit(f"chapter 7 at sae_memory_mb = {budget:g} failed:\n{proc.stderr[-3000:]}")
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            runs[-1]["tables vs first budget"] = differences(Path(tmp) / "0", Path(tmp) / str(i))
            print(f"[groups] {runs[-1]}", flush=True)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    out = args.out or RESULTS / f"in-context-groups-cpu-{date.today()}.json"
    out.write_text(json.dumps({"date": str(date.today()), "commit": commit, "params": args.params,
                               "cpus": os.cpu_count(), "runs": runs}, indent=1) + "\n")
    print(f"[groups] wrote {out}")


if __name__ == "__main__":
    main()
