"""Checksums of the demo's main result tables, stored beside the pinned demo SAEs: one demo on every machine.

    .venv/bin/python tests/demo_checksums.py            compute and compare with data/demo_saes/results.json
    .venv/bin/python tests/demo_checksums.py --write    store the computed checksums (or: make demo-checksums)

The tables are chapter 1's per-feature table (`01_features`: statistics, top tokens and verdicts of every
feature) and chapter 2's reads (`02_features`: every feature's attention profile over the later heads, and
`02_heads`: participation per head against both nulls), computed with the chapters' default parameters from the pinned
demo SAEs, in a fresh data folder (cached results are not reused: their key does not include the SAEs' bytes).

Floating-point results can differ in the last bits across processors and thread counts, so what is hashed is
a canonical form, not the bytes of the tables: rows sorted by their keys, verdicts and token lists as they
are, every floating-point value rounded to `SIGNIFICANT_DIGITS` significant digits (and -0.0 written as 0.0). One
checksum is kept per table and column, so a mismatch names the columns that moved. A value that lies within
rounding of a boundary of the last kept digit can still flip between processors, and a flip shows as one
column of one table.

Run `--write` after a change that is meant to move these results (new pinned SAEs, a changed method), and
commit data/demo_saes/results.json with it. `--add PROCESSOR` keeps the stored checksums and also accepts this
machine's for the columns that differ: for a processor whose rounding moves a kept digit (it happened on an
Intel Xeon against the AMD EPYC the checksums were made on: chapter 2's v_z columns).
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
SIGNIFICANT_DIGITS = 4
KEYS = {"01_features": ["layer", "feature"],
        "02_features": ["layer", "feature"], "02_heads": ["layer", "read_layer", "head"]}
SKIP_COLUMNS = {"neuronpedia"}  # links, not results


def _round(value: float) -> str:
    """`value` as text with SIGNIFICANT_DIGITS significant digits (nan and inf as such, -0.0 as 0.0)."""
    if not np.isfinite(value):
        return str(value)
    text = f"{value:.{SIGNIFICANT_DIGITS - 1}e}"
    return "0.0" if float(text) == 0.0 else text


def _cell(value) -> str:
    """One value in canonical text: floats rounded, sequences element by element, the rest as `str`."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)):
        return _round(float(value))
    return str(value)


def canonical_columns(frame: pd.DataFrame, keys: list[str]) -> dict[str, str]:
    """{column: canonical text of that column, rows sorted by `keys`}. `frame`: any tidy result table."""
    present = [k for k in keys if k in frame.columns]
    rows = frame.sort_values(present, kind="stable").reset_index(drop=True) if present else frame
    return {col: "\n".join(_cell(v) for v in rows[col]) for col in rows.columns if col not in SKIP_COLUMNS}


def checksums(tables: dict[str, pd.DataFrame]) -> dict[str, dict]:
    """{table: {"rows": n, "columns": {column: sha256 of its canonical text}}}."""
    out = {}
    for name, frame in tables.items():
        columns = canonical_columns(frame, KEYS.get(name, []))
        out[name] = {"rows": len(frame), "columns": {c: hashlib.sha256(t.encode()).hexdigest()[:16]
                                                     for c, t in columns.items()}}
    return out


def differences(stored: dict[str, dict], current: dict[str, dict], also: dict | None = None) -> list[str]:
    """What differs between two `checksums` results, one line per table or column; `also`: {table: {column:
    [checksums]}} also accepted (the same column computed on another processor, `--add`)."""
    lines = []
    for name in sorted(set(stored) | set(current)):
        old, new = stored.get(name), current.get(name)
        if old is None or new is None:
            lines.append(f"{name}: {'new table' if old is None else 'table no longer computed'}")
            continue
        if old["rows"] != new["rows"]:
            lines.append(f"{name}: {new['rows']} rows, {old['rows']} stored")
        for col in sorted(set(old["columns"]) | set(new["columns"])):
            accepted = [old["columns"].get(col), *((also or {}).get(name, {}).get(col, []))]
            if new["columns"].get(col) not in accepted:
                lines.append(f"{name}.{col}: " + ("new column" if col not in old["columns"] else
                                                   "column gone" if col not in new["columns"] else "moved"))
    return lines


def demo_tables() -> dict[str, pd.DataFrame]:
    """Chapter 1's `01_features` and chapter 2's `02_features` and `02_heads` on the demo, computed afresh in a
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
    parser.add_argument("--write", action="store_true", help=f"store the checksums in {STORED.name}")
    parser.add_argument("--add", metavar="PROCESSOR", help="also accept this machine's checksums of the "
                        "columns that differ (float rounding on another processor), noted under PROCESSOR")
    args = parser.parse_args(argv)
    current = checksums(demo_tables())
    if args.add:
        record = stored_checksums()
        moved = differences(record["tables"], current, record.get("also_accepted"))
        if any(not line.endswith(": moved") for line in moved):  # rows, tables or columns: not rounding
            print("\n".join(moved) + "\n[demo-checksums] not only values moved: use --write", file=sys.stderr)
            return 1
        also = record.setdefault("also_accepted", {})
        for line in moved:
            table, col = line.split(":")[0].split(".", 1)
            also.setdefault(table, {}).setdefault(col, []).append(current[table]["columns"][col])
        record.setdefault("also_accepted_from", []).append(args.add)
        STORED.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        print(f"[demo-checksums] {len(moved)} column(s) also accepted as computed on {args.add}")
        return 0
    if args.write:
        record = {"significant_digits": SIGNIFICANT_DIGITS, "keys": KEYS,
                  "note": "sha256 (first 16 hex digits) of each column in canonical form: rows sorted by the "
                          "keys, floats rounded to significant_digits, verdicts and tokens as they are; "
                          "see tests/demo_checksums.py",
                  "sae_checksums": sae_checksums(),
                  "tables": current}
        STORED.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        print(f"[demo-checksums] wrote {STORED.relative_to(REPO)}")
        return 0
    record = stored_checksums()
    lines = differences(record["tables"], current, record.get("also_accepted"))
    print("\n".join(lines) if lines else "[demo-checksums] the demo's result tables match the stored ones")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
