"""Streaming over feature rows: chunk sizes from free memory, out-of-memory halving, progress bars.

Every kernel of `compute` walks its rows (features, null directions, neurons) in chunks through `stream`, so
none of them ever holds a full `n_features x d_vocab` (or `x n_heads x ...`) result, and a chunk that does not
fit is retried with half the rows instead of failing the chapter.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable, Iterator

import torch

from weightscope.config.paths import progress_enabled

_CPU_BUDGET_BYTES = 1 << 30  # a conservative working-set budget on CPU
# Rows of scores reduced at once on a CPU: a few MiB stays in L2/L3 cache (and below glibc's mmap threshold,
# so the block's memory is reused rather than mapped and zeroed afresh each time)
CPU_BLOCK_BYTES = 8 << 20
_CUDA_FREE_FRACTION = 0.5  # leave the rest of free GPU memory to fragmentation and other users


def is_oom(err: BaseException) -> bool:
    """Whether `err` is an out-of-memory error of torch's CUDA or CPU allocator."""
    oom_type = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    if isinstance(err, (oom_type, MemoryError)):
        return True
    message = str(err).lower()
    return "out of memory" in message or "can't allocate memory" in message  # CUDA / CPU allocators


def release_cache(device: torch.device) -> None:
    """Give cached blocks back to the CUDA driver after an out-of-memory error (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


# elements (64 MB in fp32) of a product or an SAE code made at once where a chapter chunks by element count
# (chapter 4's row-wise products and layer pass, chapter 6's held-out code, chapter 7's bootstrap draws)
CHUNK_ELEMENTS = 1 << 24


# A CPU product writes its rows faster when each starts on a 64-byte line: [1,780 x 768] @ [768 x 50,257]
# (GPT-2's vocabulary) 131 GFLOP/s into packed rows here, 177 into rows 50,272 apart (bench_scores_buffer.py)
_ROW_ALIGN_BYTES = 64


def scores_buffer(rows: int, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[rows, cols] CPU tensor (uninitialised) for a product's output, its rows padded to whole 64-byte lines:
    a view with stride (ld, 1), ld = cols rounded up, never read past `cols`. Reused chunk after chunk."""
    per_line = max(1, _ROW_ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
    ld = -(-cols // per_line) * per_line
    return torch.empty(rows, ld, dtype=dtype)[:, :cols]


def memory_budget(device: torch.device) -> int:
    """Bytes one chunk's working set may use: half of free GPU memory, or min(1 GiB, available / 4) on CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * _CUDA_FREE_FRACTION)
    try:
        import psutil
    except ImportError:
        return _CPU_BUDGET_BYTES
    return int(min(_CPU_BUDGET_BYTES, psutil.virtual_memory().available // 4))


def auto_chunk_size(width: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk so that one chunk's working set (`width` scores a row) fits `memory_budget`."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    # scores in `dtype`, their fp32 copy (same tensor for fp32), one fp32 scratch, top-k temporaries
    bytes_per_row = width * (itemsize + 4 * (3 if itemsize < 4 else 2))
    return max(1, memory_budget(device) // bytes_per_row)


def check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of features or None; got {chunk_size}.")


class NoBar:
    """A progress bar that shows nothing (progress=False, or tqdm missing)."""

    def update(self, n: int) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass

    def close(self) -> None:
        pass


LINE_EVERY_S = 10.0  # the longest a long step stays silent in the book runner's terminal
LINES = "lines"  # WEIGHTSCOPE_PROGRESS=lines (the book runner's kernels): progress as `LineBar` lines


class LineBar(NoBar):
    """Progress as lines on stderr, "[progress] token scores: 4,096/16,384 features (25%), 31 s, about 93 s
    left": one when `every` seconds have passed since the last line of any `LineBar`, so a run of short steps
    is reported as one long step is, and work shorter than that prints nothing. A notebook's bar is a widget,
    which never reaches the terminal the book runs in; these lines do (the runner relays them, then drops
    them from the page)."""

    last_line = time.monotonic()  # when any LineBar last printed (first: when this module was imported)

    _lock = threading.Lock()  # bootstraps run side by side (`populations.in_threads`) update one bar

    def __init__(self, total: int, desc: str, unit: str, every: float = LINE_EVERY_S):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.n, self.start = 0, time.monotonic()

    def update(self, n: int) -> None:
        with LineBar._lock:
            self.n += n
            now = time.monotonic()
            if now - LineBar.last_line < self.every:
                return
            LineBar.last_line = now
        print(self.line(now - self.start), file=sys.stderr, flush=True)

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def line(self, elapsed: float) -> str:
        done = self.n / self.total if self.total else 1.0
        left = f", about {elapsed * (1 - done) / done:,.0f} s left" if 0 < done < 1 else ""
        return (f"[progress] {self.desc}: {self.n:,}/{self.total:,} {self.unit}s ({done:.0%}), "
                f"{elapsed:,.0f} s{left}")


def announce(text: str) -> None:
    """One `[progress] text` line in a kernel the book runner started (WEIGHTSCOPE_PROGRESS=lines), for a
    one-off wait no bar can count (a compile); elsewhere nothing."""
    if progress_enabled() and os.environ.get("WEIGHTSCOPE_PROGRESS") == LINES:
        LineBar.last_line = time.monotonic()
        print(f"[progress] {text}", file=sys.stderr, flush=True)


def progress_bar(total: int, enabled: bool, desc: str = "token scores", unit: str = "feature"):
    """A tqdm bar over `total` rows; a `LineBar` in a kernel the book runner started (WEIGHTSCOPE_PROGRESS=
    lines); or a `NoBar` (when not enabled, or WEIGHTSCOPE_PROGRESS=0: a kernel's tqdm draws a widget, which
    nbval would compare with the stored page). The tqdm bar clears itself when done (leave=False): a chapter
    calls kernels several times a layer, and finished bars would pile up in a notebook run by hand."""
    if not enabled or not progress_enabled():
        return NoBar()
    if os.environ.get("WEIGHTSCOPE_PROGRESS") == LINES:
        return LineBar(total, desc, unit)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return NoBar()
    return tqdm(total=total, unit=unit, desc=desc, leave=False)


def attempt(compute: Callable[[int, int], object], start: int, rows: int) -> tuple[object, bool]:
    """(compute(start, rows), False), or (None, True) on out-of-memory so that the caller can retry."""
    try:
        return compute(start, rows), False
    except (RuntimeError, MemoryError) as err:  # torch.OutOfMemoryError is a RuntimeError
        if not is_oom(err):
            raise
    return None, True  # outside the except block, so the traceback (and the chunk's tensors) is gone


def stream(
    n: int, chunk_size: int, compute: Callable[[int, int], object], device: torch.device, *, what: str, bar
) -> Iterator[tuple[int, int, object]]:
    """Yield (start, rows, compute(start, rows)) over 0..n; on out-of-memory halve the chunk and retry it."""
    start = 0
    while start < n:
        rows = min(chunk_size, n - start)
        result, oom = attempt(compute, start, rows)
        if oom:  # the failed chunk's tensors are released by now; retry the same rows with half
            if rows == 1:
                raise RuntimeError(
                    f"{what} ran out of memory on a single feature on {device}. Free memory on that device, "
                    "or pass device='cpu' or a smaller dtype."
                )
            chunk_size = rows // 2
            release_cache(device)
            continue
        yield start, rows, result
        start += rows
        bar.update(rows)
