"""Does a result depend on the processor? The demo's chapters on two kernel sets of this machine, compared.

    .venv/bin/python tests/processor_check.py        (or: make processor-check; about 80 s on 2 cores)

Floating-point kernels differ between processors (AVX-512 or AVX2 matrix products sum in another order), so
a result computed on one machine differs from another's in its last bits. That is harmless unless a discrete
choice follows those bits: a top-k at a near-tie, a threshold at a boundary. Such choices made chapter 7's
pair table and chapter 4's families differ between machines. This check runs every registered chapter
(`weightscope.chapters.CHAPTERS`, default `Config`) on the demo twice, in fresh data folders: once with this
machine's own kernels, once with another set chosen by environment variables (`alternative_kernels`: AVX2
where the processor has AVX-512, else SSE4.2 and no vectorisation), then compares every stored result table:
columns that are not floating point exactly (verdicts, tokens, ids, chosen positions), floating-point ones
within `TOLERANCE` x their root mean square. A difference names the table, the column and an example.

One kind of difference is reported as a note, not a failure: a token list whose places differ only where two
tokens score the same within `NEAR_TIE` of the row's largest score. Such a near-tie is a coincidence of two
continuous scores (chapter 6's token lens on the demo, SSE4.2 against AVX-512 kernels: two tokens 3e-7 apart
swapped places), and no rule orders it the same on every processor: rounding the scores first only moves the
boundary. Near-ties of structure, equal activations of identical contexts, are what `compute/ranking.py`
removes, and those fail here.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from demo_checksums import _cell, _floats  # noqa: E402

TOLERANCE = 1e-4
NEAR_TIE = 1e-5  # two scores this close (of the row's largest) differ by rounding: ~1e-7 measured, 3e-7 seen
# rounding errors by design: the DFA split's |sum - pre-activation| (its page shows only whether it is exact)
ROUNDING_COLUMNS = {"04_dfa_examples": {"abs_error", "error_vs_sae_lens"}}
SKIP_COLUMNS = {"neuronpedia"}  # links, not results


def alternative_kernels() -> dict[str, str]:
    """Environment variables that make torch, MKL and oneDNN use another instruction set than their own."""
    import torch

    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        return {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                "ONEDNN_MAX_CPU_ISA": "AVX2"}
    return {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
            "ONEDNN_MAX_CPU_ISA": "SSE41"}


def run_chapters(data: Path) -> None:
    """Every registered chapter on the demo, in order, its tables stored under `data`/results/demo."""
    os.environ["WEIGHTSCOPE_DATA"] = str(data)
    from weightscope.chapters import CHAPTERS
    from weightscope.chapters.context import open_chapter

    for stem, module in CHAPTERS.items():
        print(f"[processor-check] {stem}", flush=True)
        mod = importlib.import_module(module)
        mod.run(open_chapter("demo"), mod.Config())


def _sorted_rows(a: pd.DataFrame, b: pd.DataFrame, exact: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both tables with rows sorted by their exact columns as text, scalar ones (the keys) first: row order is
    not a result, and a list that differs must not move its row."""
    lists = {c for c in exact if len(a) and isinstance(a[c].iloc[0], (list, tuple, np.ndarray))}
    keys = [c for c in exact if c not in lists] + [c for c in exact if c in lists]

    def order(frame):
        text = pd.DataFrame({c: frame[c].map(_cell) for c in keys})
        return frame.loc[text.sort_values(keys, kind="stable").index].reset_index(drop=True)
    return (order(a), order(b)) if keys else (a, b)


def _near_ties(a: pd.DataFrame, b: pd.DataFrame, c: str, differ: np.ndarray) -> np.ndarray:
    """bool per row in `differ`: a token list `c` (`*_ids`, `*_tokens`) whose every differing place holds,
    in both tables, scores within `NEAR_TIE` of the row's largest |score| (its `*_scores` list): two tokens
    that score the same up to rounding, which no rule orders the same on every processor."""
    scores = c.rsplit("_", 1)[0] + "_scores"
    out = np.zeros(len(differ), dtype=bool)
    if scores not in a.columns:
        return out
    for row in np.flatnonzero(differ):
        x, y = np.asarray(a[c].iloc[row]), np.asarray(b[c].iloc[row])
        sx, sy = np.asarray(a[scores].iloc[row], float), np.asarray(b[scores].iloc[row], float)
        if x.shape == y.shape == sx.shape == sy.shape:
            gap = np.abs(sx - sy)[x != y]
            out[row] = bool(np.all(gap <= NEAR_TIE * np.abs(sx).max()))
    return out


def table_differences(name: str, a: pd.DataFrame, b: pd.DataFrame) -> tuple[list[str], list[str]]:
    """How table `b` differs from `a`: (differences, one line per column; notes: token lists that differ
    only by near-ties, `_near_ties`). Both empty: the same up to rounding."""
    if a.shape != b.shape or list(a.columns) != list(b.columns):
        shapes = f"shape {b.shape}, columns {list(b.columns)}, against {a.shape}, {list(a.columns)}"
        return [f"{name}: {shapes}"], []
    if not len(a):
        return [], []
    rounding = ROUNDING_COLUMNS.get(Path(name).name, set())  # name: a path, e.g. demo/04_dfa_examples
    columns = [c for c in a.columns if c not in SKIP_COLUMNS | rounding]
    floats = [c for c in columns if _floats(a[c]) is not None]  # what kind; compared after sorting
    exact = [c for c in columns if c not in floats]
    a, b = _sorted_rows(a, b, exact)
    lines, notes = [], []
    for c in exact:
        x, y = a[c].map(_cell), b[c].map(_cell)
        differ = (x != y).to_numpy()
        tie = _near_ties(a, b, c, differ)
        if tie.any():
            notes.append(f"{name}.{c}: {int(tie.sum())} rows differ only where two tokens score the same "
                         f"within {NEAR_TIE:.0e} of the row's largest score (near-ties)")
        if (differ & ~tie).any():
            i = int(np.flatnonzero(differ & ~tie)[0])
            lines.append(f"{name}.{c}: {int((differ & ~tie).sum())} rows differ, e.g. {x[i]:.60} against "
                         f"{y[i]:.60}")
    for c in floats:
        x, y = _floats(a[c]), _floats(b[c])
        if y is None or x.shape != y.shape or (np.isfinite(x) != np.isfinite(y)).any():
            lines.append(f"{name}.{c}: other lengths or other values not finite")
            continue
        ok = np.isfinite(x)
        scale = float(np.sqrt(np.mean(x[ok] ** 2))) if ok.any() else 0.0
        gap = float(np.abs(x[ok] - y[ok]).max()) if ok.any() else 0.0
        scale = max(scale, np.finfo(np.float64).tiny)
        if gap > TOLERANCE * scale:
            lines.append(f"{name}.{c}: moved by up to {gap / scale:.1e} of its root mean square")
    return lines, notes


def folder_differences(a: Path, b: Path) -> tuple[list[str], list[str]]:
    """`table_differences` for every table (parquet) stored under folder `a`, against the same under `b`."""
    lines, notes = [], []
    for path in sorted(a.rglob("*.parquet")):
        rel = path.relative_to(a)
        other = b / rel
        name = rel.with_suffix("").as_posix()
        if not other.is_file():
            lines.append(f"{name}: not computed with the other kernels")
            continue
        more, also = table_differences(name, pd.read_parquet(path), pd.read_parquet(other))
        lines, notes = lines + more, notes + also
    return lines, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)  # one side, in a fresh process
    args = parser.parse_args(argv)
    if args.run:
        run_chapters(args.run)
        return 0
    kernels = alternative_kernels()
    with tempfile.TemporaryDirectory(prefix="weightscope-processor-") as tmp:
        for side, env in (("own", {}), ("other", kernels)):
            which = "this machine's own kernels" if not env else "the kernels " + " ".join(
                f"{k}={v}" for k, v in env.items()) + " choose"
            print(f"[processor-check] the demo's chapters with {which}", flush=True)
            subprocess.run([sys.executable, __file__, "--run", str(Path(tmp) / side)], check=True,
                           env={**os.environ, **env})
        lines, notes = folder_differences(Path(tmp) / "own" / "results", Path(tmp) / "other" / "results")
    for note in notes:
        print(f"[processor-check] note: {note}")
    same = (f"[processor-check] every stored table is the same with both kernel sets (exact columns exactly, "
            f"floating-point ones within {TOLERANCE:.0e} of their root mean square"
            + (", token lists up to near-ties)" if notes else ")"))
    print("\n".join(lines) if lines else same)
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
