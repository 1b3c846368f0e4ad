"""Fingerprints of the demo's main result tables, stored beside the pinned demo SAEs: one demo everywhere.

    .venv/bin/python tests/demo_checksums.py            compute and compare with data/demo_saes/results.json
    .venv/bin/python tests/demo_checksums.py --write    store them (or: make demo-checksums)

The tables are chapter 1's per-feature table (`01_features`: statistics, top tokens and verdicts of every
feature) and chapter 2's reads (`02_features`: every feature's attention profile over the later heads, and
`02_heads`: participation per head against both nulls), computed with the chapters' default parameters from
the pinned demo SAEs, in a fresh data folder (cached results are not reused: their key does not include the
SAEs' bytes).

Rows are sorted by the table's keys; then each column is fingerprinted by its kind:
- verdicts, tokens, ids and keys (anything not floating point): a sha256 of the column as text, compared
  exactly, so one flipped verdict or reordered token list fails;
- floating-point columns (lists of floats concatenated row by row): their length, their Euclidean norm and
  their dot products with `N_PROJECTIONS` fixed random sign vectors, plus a sha256 of where they are not
  finite. The column matches when the norm and every projection lie within `TOLERANCE` x the stored norm.
  Floating-point results differ in the last bits between processors (their matrix kernels sum in another
  order), and values near zero (a mean or a skew of about 0) then move by a large share of themselves: judged
  on their column's norm, they do not count. Measured on this demo (Intel Xeon, its AVX-512 kernels against
  MKL's, oneDNN's and ATen's AVX2 ones, chosen by environment variables, alone and together): values moved by
  at most 2.2e-6 of their column's root mean square, the fingerprints by at most 1.5e-6 of the norm (a
  per-layer threshold, the same in all 512 rows of its layer, where the differences add up), every exact
  column alike. A change of one value by `TOLERANCE` x the norm moves every projection by that much and
  fails: for chapter 1's 2,560 features, 0.5% of the column's root mean square (1.6% in its lists of ten
  scores); a change to many values fails far sooner.

Token lists are compared exactly; two tokens that score the same within rounding can still swap places on
another processor (`tests/processor_check.py` says why no rule prevents it); none did in these tables under
any of the kernel sets above.

Run `--write` after a change that is meant to move these results (new pinned SAEs, a changed method), and
commit data/demo_saes/results.json with it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
STORED = REPO / "data" / "demo_saes" / "results.json"
TOLERANCE = 1e-4
N_PROJECTIONS = 8
KEYS = {"01_features": ["layer", "feature"],
        "02_features": ["layer", "feature"], "02_heads": ["layer", "read_layer", "head"]}
SKIP_COLUMNS = {"neuronpedia"}  # links, not results


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _floats(column: pd.Series) -> np.ndarray | None:
    """float64 [n values] of a column of floats or of lists of floats (concatenated row by row); None for
    any other column."""
    first = column.iloc[0] if len(column) else None
    if isinstance(first, (float, np.floating)):
        return column.to_numpy(dtype=np.float64)
    if isinstance(first, (list, tuple, np.ndarray)) and len(first):
        if all(isinstance(v, (float, np.floating)) for v in first):
            return np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in column])
    return None


def _cell(value) -> str:
    """One value as text: sequences element by element, booleans as True/False, the rest as `str`."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    return str(value)


def _signs(n: int) -> np.ndarray:
    """[N_PROJECTIONS, n] fixed random +-1: the same on every machine for the same n."""
    return np.random.default_rng(0).integers(0, 2, size=(N_PROJECTIONS, n)).astype(np.float64) * 2 - 1


def fingerprint(column: pd.Series) -> dict:
    """A column's fingerprint: {"sha": ...} for exact columns; {"n", "norm", "proj", "nonfinite"} for
    floating-point ones (see the module's docstring)."""
    values = _floats(column)
    if values is None:
        return {"sha": _sha("\n".join(_cell(v) for v in column))}
    finite = np.isfinite(values)
    clean = np.where(finite, values, 0.0)
    return {"n": int(values.size), "norm": float(np.linalg.norm(clean)),
            "proj": [float(p) for p in _signs(values.size) @ clean],
            "nonfinite": _sha(" ".join(map(str, np.flatnonzero(~finite))))}


def checksums(tables: dict[str, pd.DataFrame]) -> dict[str, dict]:
    """{table: {"rows": n, "columns": {column: `fingerprint`}}}, rows sorted by the table's keys."""
    out = {}
    for name, frame in tables.items():
        present = [k for k in KEYS.get(name, []) if k in frame.columns]
        rows = frame.sort_values(present, kind="stable").reset_index(drop=True) if present else frame
        out[name] = {"rows": len(frame), "columns": {c: fingerprint(rows[c]) for c in rows.columns
                                                     if c not in SKIP_COLUMNS}}
    return out


def column_moved(old: dict, new: dict) -> str | None:
    """Why a column's fingerprint `new` does not match the stored `old`, or None when it does."""
    if "sha" in old or "sha" in new:
        return None if old.get("sha") == new.get("sha") else "moved"
    if old["n"] != new["n"]:
        return f"{new['n']} values, {old['n']} stored"
    if old["nonfinite"] != new["nonfinite"]:
        return "other values not finite"
    scale = max(old["norm"], np.finfo(np.float64).tiny)
    gap = max(abs(new["norm"] - old["norm"]), *(abs(a - b) for a, b in zip(new["proj"], old["proj"])))
    if gap <= TOLERANCE * scale:
        return None
    return f"moved by {gap / scale:.1e} of its norm (tolerance {TOLERANCE:.0e})"


def differences(stored: dict[str, dict], current: dict[str, dict]) -> list[str]:
    """What differs between two `checksums` results, one line per table or column."""
    lines = []
    for name in sorted(set(stored) | set(current)):
        old, new = stored.get(name), current.get(name)
        if old is None or new is None:
            lines.append(f"{name}: {'new table' if old is None else 'table no longer computed'}")
            continue
        if old["rows"] != new["rows"]:
            lines.append(f"{name}: {new['rows']} rows, {old['rows']} stored")
        for col in sorted(set(old["columns"]) | set(new["columns"])):
            if col not in old["columns"] or col not in new["columns"]:
                gone = "new column" if col not in old["columns"] else "column gone"
                lines.append(f"{name}.{col}: {gone}")
            elif (why := column_moved(old["columns"][col], new["columns"][col])) is not None:
                lines.append(f"{name}.{col}: {why}")
    return lines


def demo_tables() -> dict[str, pd.DataFrame]:
    """Chapter 1's `01_features`, chapter 2's `02_features` and `02_heads` on the demo, computed afresh in a
    temporary data folder (the current process's WEIGHTSCOPE_DATA is restored afterwards)."""
    from weightscope.chapters import attention, output_tokens
    from weightscope.chapters.context import open_chapter

    previous = os.environ.get("WEIGHTSCOPE_DATA")
    with tempfile.TemporaryDirectory(prefix="weightscope-checksums-") as tmp:
        os.environ["WEIGHTSCOPE_DATA"] = tmp
        try:
            ctx = open_chapter("demo")
            model, saes = ctx.load_model_and_saes()
            features = output_tokens.run(ctx, output_tokens.Config(), model=model, saes=saes).features
            reads = attention.run(ctx, attention.Config(), model=model, saes=saes)
        finally:
            if previous is None:
                os.environ.pop("WEIGHTSCOPE_DATA", None)
            else:
                os.environ["WEIGHTSCOPE_DATA"] = previous
    return {"01_features": features, "02_features": reads.features, "02_heads": reads.heads}


def sae_checksums() -> str:
    """sha256 of the SHA256SUMS of the demo SAEs in use: which SAEs the stored checksums were made from."""
    from weightscope.load.saes import CHECKSUMS, demo_sae_folder

    folder = demo_sae_folder("default")
    sums = folder / CHECKSUMS
    if not sums.is_file():
        return f"unpinned: {folder.name}"
    return hashlib.sha256(sums.read_bytes()).hexdigest()[:16]


def missing_demo_inputs() -> list[str]:
    """The demo's inputs that are not on this machine (the tests run offline): the stories260K checkpoint
    and tokenizer (`WEIGHTSCOPE_MODELS`, or the download cache) and the TinyStories files
    (`WEIGHTSCOPE_CORPORA`)."""
    from weightscope.config.paths import cache_dir, corpora_dir, models_dir
    from weightscope.load import corpora

    folders = [f for f in (models_dir(), cache_dir() / "models") if f is not None]
    missing = []
    for name in ("stories260K.bin", "tok512.bin"):
        if not any((f / "stories260K" / name).is_file() for f in folders):
            missing.append(f"stories260K/{name} (set WEIGHTSCOPE_MODELS to the folder holding stories260K/)")
    root = corpora_dir()
    for name in (corpora.STORIES_CASED, corpora.STORIES_LOWER):
        if root is None or not (root / name).is_file():
            missing.append(f"{name} (set WEIGHTSCOPE_CORPORA to the folder holding tinystories/)")
    return missing


def stored_checksums() -> dict:
    return json.loads(STORED.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"store the fingerprints in {STORED.name}")
    args = parser.parse_args(argv)
    current = checksums(demo_tables())
    if args.write:
        record = {"tolerance": TOLERANCE, "n_projections": N_PROJECTIONS, "keys": KEYS,
                  "note": "per column, rows sorted by the keys: sha256 (first 16 hex digits) of exact "
                          "columns; length, norm and projections on fixed random signs of floating-point "
                          "ones, compared within tolerance x norm; see tests/demo_checksums.py",
                  "sae_checksums": sae_checksums(),
                  "tables": current}
        STORED.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        print(f"[demo-checksums] wrote {STORED.relative_to(REPO)}")
        return 0
    record = stored_checksums()
    lines = differences(record["tables"], current)
    print("\n".join(lines) if lines else "[demo-checksums] the demo's result tables match the stored ones")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
