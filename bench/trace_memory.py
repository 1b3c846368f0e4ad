"""Where a chapter's memory goes: run one chapter's `run(ctx, Config())` in this process and print, at each new
peak of the resident set (sampled every 0.05 s), the library frames the main thread was in.

    WEIGHTSCOPE_DATA=... python bench/trace_memory.py PARAMS 07 [--step-mb 50]

PARAMS is a params file (or name) whose earlier chapters' tables are already in WEIGHTSCOPE_DATA (run them with
`python -m weightscope.publish.book --target PARAMS --chapters 01 02 03 --no-html`); the second argument is the
chapter's number (chapters 1-7: those with a `run`). A line is printed when the resident set passes the last peak
by --step-mb, and every 15 s otherwise, so a phase that grows and one that holds are told apart. The chapter's
own cached tables are reused where present: delete them to trace the computation.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import threading
import time
import traceback
from pathlib import Path

import psutil


def library_frames(thread_id: int, depth: int = 4) -> str:
    """The innermost `depth` weightscope frames of a thread, innermost first."""
    frame = sys._current_frames().get(thread_id)
    frames = [f for f in traceback.extract_stack(frame) if "weightscope" in f.filename][::-1][:depth]
    return " < ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in frames)


def sample(main_id: int, step: float, t0: float, stop: threading.Event, peak: list) -> None:
    """Print the resident set at each new peak (by `step` bytes) and every 15 s; keep the peak in peak[0]."""
    proc, last = psutil.Process(), 0.0
    while not stop.is_set():
        rss = proc.memory_info().rss
        if rss > peak[0] + step or time.time() - last > 15:
            kind = "peak" if rss > peak[0] + step else "rss "
            peak[0] = max(peak[0], rss)
            last = time.time()
            print(f"[{last - t0:7.1f} s] {kind} {rss / 1e9:.2f} GB  {library_frames(main_id)}", flush=True)
        stop.wait(0.05)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("params", help="params file or name (its earlier chapters' tables already made)")
    ap.add_argument("chapter", help="chapter number, 01 to 07")
    ap.add_argument("--step-mb", type=float, default=50.0, help="print when the peak grows by this much")
    args = ap.parse_args(argv)
    from weightscope.chapters import CHAPTERS
    from weightscope.chapters.context import open_chapter

    stems = {stem[:2]: stem for stem in CHAPTERS}
    if args.chapter.zfill(2) not in stems:
        ap.error(f"no chapter {args.chapter!r} with a run(ctx, config); choose one of {', '.join(sorted(stems))}")
    module = importlib.import_module(CHAPTERS[stems[args.chapter.zfill(2)]])
    t0, stop, peak = time.time(), threading.Event(), [0]
    thread = threading.Thread(target=sample, args=(threading.get_ident(), args.step_mb * 1e6, t0, stop, peak),
                              daemon=True)
    thread.start()
    try:
        module.run(open_chapter(args.params), module.Config())
    finally:
        stop.set()
        thread.join()
    print(f"done in {time.time() - t0:.0f} s; peak resident set {peak[0] / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
