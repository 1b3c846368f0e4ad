"""What chapter 6's weights-only tables take in memory, and what is left of them while they wait on disk
through its held-out checks: build them from the chapter's cache (run the chapter first) in a fresh process,
set aside the ones the chapter sets aside, and print the resident set above the start each time.

    WEIGHTSCOPE_DATA=DIR/data python bench/chapter6_tables.py PARAMS

`ffkv.run` keeps these tables (chapter 1's lens rows with their token lists, the reads, the alignment, and
small ones) from its weights-only steps to its summary. Through the held-out checks, where the chapter peaks,
the three that grow with layers x rows (`ffkv.GROWN`) wait on disk (`io.set_aside`); `bench_book.HOLDS` does
not count them. Steps that are not cached (the pairing, the key choice of a gated MLP) are computed. The cache
is keyed by the library's code: after an edit every step is computed again, and the figures then include
their working memory (1.51 against 1.13 GB at GPT-2 width, 12 blocks): run it twice.
"""

from __future__ import annotations

import argparse
import gc

import psutil


def main() -> None:
    from weightscope import io
    from weightscope.chapters import ffkv
    from weightscope.chapters.context import open_chapter

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("params", help="params file (or name) whose chapter-6 tables are cached")
    args = ap.parse_args()
    ctx = open_chapter(args.params)
    model, saes = ctx.load_model_and_saes(mlp=True)
    process = psutil.Process()
    gc.collect()
    before = process.memory_info().rss
    tables = ffkv.weight_tables(ctx, ffkv.Config(), model, saes)
    gc.collect()
    grown = (process.memory_info().rss - before) / 1e9
    deep = sum(t.memory_usage(deep=True).sum() for t in tables.values()) / 1e9
    print(f"chapter 6's weights-only tables: {grown:.2f} GB resident (pandas' deep size {deep:.2f} GB); "
          f"lens rows {len(tables['lens_rows']):,}, reads {len(tables['reads']):,}")
    grown_tables = {name: tables.pop(name) for name in ffkv.GROWN}
    with io.set_aside(grown_tables, ctx.params.target):
        aside = (process.memory_info().rss - before) / 1e9
    back = (process.memory_info().rss - before) / 1e9
    print(f"with {', '.join(ffkv.GROWN)} set aside: {aside:.2f} GB resident; read back: {back:.2f} GB")


if __name__ == "__main__":
    main()
