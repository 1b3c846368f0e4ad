"""Chapter-1 metric kernels against naive full-matrix references (CPU, small random inputs)."""

from __future__ import annotations

import math
from pathlib import Path
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from weightscope.compute import folding, streaming
from weightscope.compute import token_scores as K

STATS = ("max", "min", "mean", "std", "top_z", "skew", "kurtosis", "entropy")


# ---------------------------------------------------------------------------------------------------------
# Naive reference: materialise all scores, then plain float64 formulas row by row.
# ---------------------------------------------------------------------------------------------------------


def naive(D: torch.Tensor, M: torch.Tensor, dtype=torch.float32) -> dict:
    S = D.to(dtype) @ M.to(dtype)  # full [n, V] product in the compute dtype
    X = S.double().numpy()
    with np.errstate(divide="ignore", invalid="ignore"):  # constant rows: std 0, NaN shape statistics
        return _naive_stats(X)


def _naive_stats(X: np.ndarray) -> dict:
    mean = X.mean(1)
    std = X.std(1)
    dev = X - mean[:, None]
    shifted = X - X.max(1, keepdims=True)
    p = np.exp(shifted) / np.exp(shifted).sum(1, keepdims=True)
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return {
        "S": X,
        "max": X.max(1),
        "min": X.min(1),
        "mean": mean,
        "std": std,
        "top_z": (X.max(1) - mean) / std,
        "skew": (dev**3).mean(1) / std**3,
        "kurtosis": (dev**4).mean(1) / std**4 - 3.0,
        "entropy": -plogp.sum(1),
    }


def assert_valid_extremes(ids, scores, S, *, largest: bool, atol: float) -> None:
    """Tie-robust top/bottom-k check: right k values, in order, each id really scores what is reported."""
    ids, scores = ids.numpy(), scores.double().numpy()
    k = ids.shape[1]
    order = -np.sort(-S, axis=1) if largest else np.sort(S, axis=1)
    np.testing.assert_allclose(scores, order[:, :k], rtol=0, atol=atol)
    steps = np.diff(scores, axis=1)
    assert (steps <= 0).all() if largest else (steps >= 0).all(), "extremes are not sorted"
    np.testing.assert_allclose(np.take_along_axis(S, ids, axis=1), scores, rtol=0, atol=atol)
    assert all(len(set(row)) == k for row in ids.tolist()), "a token id repeats within one feature"


def assert_matches_naive(result: K.TokenScoreStats, ref: dict, *, rtol: float, atol_scale: float) -> None:
    scale = np.abs(ref["S"]).max()
    assert_valid_extremes(result.top_ids, result.top_scores, ref["S"], largest=True, atol=atol_scale * scale)
    assert_valid_extremes(
        result.bottom_ids, result.bottom_scores, ref["S"], largest=False, atol=atol_scale * scale
    )
    tolerances = {  # absolute tolerances in the statistic's own units
        "max": atol_scale * scale,
        "min": atol_scale * scale,
        "mean": atol_scale * scale,
        "std": atol_scale * scale,
        "top_z": rtol * 10,
        "skew": rtol * 10,
        "kurtosis": rtol * 30,
        "entropy": rtol * 10,
    }
    for name in STATS:
        np.testing.assert_allclose(
            getattr(result, name).double().numpy(), ref[name], rtol=rtol, atol=tolerances[name], err_msg=name
        )


def gaussian(n, d, V, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(d, V, generator=g) * 0.3 + offset


def small_integers(shape, seed, low=-2, high=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, shape, generator=g).float()


# ---------------------------------------------------------------------------------------------------------
# token_score_stats
# ---------------------------------------------------------------------------------------------------------


# 30: plain torch.topk (V < 8k); 100: two-stage top-k; 1500: two-stage with leftover columns
@pytest.mark.parametrize("d_vocab", [30, 100, 1500])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 23, 64, None])
@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_fp32_matches_naive(d_vocab, chunk_size, fused):
    D, M = gaussian(23, 16, d_vocab)
    result = K.token_score_stats(D, M, k=5, chunk_size=chunk_size, progress=False, fused=fused)
    assert_matches_naive(result, naive(D, M), rtol=1e-4, atol_scale=1e-5)
    assert result.top_ids.dtype == torch.int64 and result.top_scores.dtype == torch.float32
    assert result.top_ids.shape == (23, 5) and result.entropy.shape == (23,) and result.d_vocab == d_vocab


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_row_blocks_within_a_chunk_match_naive(monkeypatch, dtype, fused):
    # On CPU a chunk is processed in cache-sized row blocks; make them 3 rows so chunks of 10 split 3+3+3+1.
    D, M = gaussian(25, 16, 1100, seed=16)
    monkeypatch.setattr(K, "CPU_BLOCK_BYTES", 3 * 4 * 1100)
    result = K.token_score_stats(D.to(dtype), M.to(dtype), k=4, chunk_size=10, progress=False, fused=fused)
    if dtype == torch.float32:
        assert_matches_naive(result, naive(D, M), rtol=1e-4, atol_scale=1e-5)
    else:
        assert_matches_naive(result, naive(D, M, dtype), rtol=2e-2, atol_scale=1e-2)


@pytest.mark.parametrize("chunk_size", [1, 5, None])
def test_bf16_inputs_match_naive_bf16_product(chunk_size):
    D, M = gaussian(17, 32, 1400, seed=1)
    D, M = D.bfloat16(), M.bfloat16()
    result = K.token_score_stats(D, M, k=4, chunk_size=chunk_size, progress=False)
    # the product is rounded to bf16 (~3 significant digits), whatever the chunking
    assert_matches_naive(result, naive(D, M, torch.bfloat16), rtol=2e-2, atol_scale=1e-2)


def test_dtype_argument_sets_the_product_dtype():
    D, M = gaussian(9, 32, 700, seed=2)
    result = K.token_score_stats(D, M, k=3, dtype=torch.bfloat16, progress=False)
    assert_matches_naive(result, naive(D, M, torch.bfloat16), rtol=2e-2, atol_scale=1e-2)
    assert result.top_scores.dtype == torch.float32  # results are fp32 whatever the product's dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_exact_scores_with_ties_and_fp32_accumulation(dtype, fused):
    # Small integers make every score exact in bf16 too, and duplicated columns make exact ties, so any
    # difference comes from the kernel: a wrong tie-break would repeat ids, bf16 accumulation would show up
    # in the mean/moments (sums over 1,000 tokens are not representable in bf16).
    M0 = small_integers((8, 200), seed=3)
    M = torch.cat([M0, M0, M0, M0, M0[:, :37]], dim=1)  # 837 columns, each value repeated 4-5 times
    D = small_integers((13, 8), seed=4)
    D[5] = 0.0  # a dead feature: every score equal
    result = K.token_score_stats(D.to(dtype), M.to(dtype), k=6, chunk_size=4, progress=False, fused=fused)
    ref = naive(D, M)  # exact in fp32
    live = np.arange(13) != 5
    for name in STATS:
        np.testing.assert_allclose(
            getattr(result, name).numpy()[live], ref[name][live], rtol=1e-5, atol=1e-5, err_msg=name
        )
    assert_valid_extremes(result.top_ids, result.top_scores, ref["S"], largest=True, atol=0)
    assert_valid_extremes(result.bottom_ids, result.bottom_scores, ref["S"], largest=False, atol=0)


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_constant_feature_has_zero_std_nan_shape_and_flat_entropy(fused):
    D, M = gaussian(3, 8, 300, seed=5)
    D[1] = 0.0
    result = K.token_score_stats(D, M, k=2, progress=False, fused=fused)
    assert result.std[1] == 0 and result.max[1] == 0 and result.min[1] == 0
    assert all(math.isnan(getattr(result, name)[1]) for name in ("top_z", "skew", "kurtosis"))
    assert result.entropy[1] == pytest.approx(math.log(300), rel=1e-6)
    assert not torch.isnan(result.kurtosis[[0, 2]]).any()


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_large_mean_does_not_cost_precision(fused):
    # Scores around 4e3 with a spread of ~5: raw power sums (E[x^4] - ...) in fp32 would be noise here.
    M = small_integers((8, 600), seed=6) + 500.0
    D = small_integers((6, 8), seed=7, low=1, high=3)  # positive rows, so every score is large
    result = K.token_score_stats(D, M, k=3, chunk_size=4, progress=False, fused=fused)
    ref = naive(D, M)
    assert ref["mean"].min() > 1000
    for name in ("std", "skew", "kurtosis", "top_z", "entropy"):
        got = getattr(result, name).numpy()
        np.testing.assert_allclose(got, ref[name], rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_peaked_distribution_entropy_near_zero_is_accurate(fused):
    D, M = gaussian(4, 16, 2000, seed=8)
    D = D * 200  # one token dominates the softmax
    result = K.token_score_stats(D, M, k=2, progress=False, fused=fused)
    ref = naive(D, M)
    assert ref["entropy"].max() < 0.01
    np.testing.assert_allclose(result.entropy.numpy(), ref["entropy"], rtol=1e-3, atol=1e-7)


def test_untied_embedding_and_unembedding_sides():
    # Encoder side: D = W_enc.T, M = W_E.T (both transposed views); decoder side: D = W_dec, M = W_U.
    g = torch.Generator().manual_seed(9)
    d_model, d_vocab, n = 24, 900, 11
    W_E, W_U = torch.randn(d_vocab, d_model, generator=g), torch.randn(d_model, d_vocab, generator=g)
    W_enc, W_dec = torch.randn(d_model, n, generator=g), torch.randn(n, d_model, generator=g)
    enc = K.token_score_stats(W_enc.T, W_E.T, k=4, chunk_size=4, progress=False)
    dec = K.token_score_stats(W_dec, W_U, k=4, chunk_size=4, progress=False)
    assert_matches_naive(enc, naive(W_enc.T, W_E.T), rtol=1e-4, atol_scale=1e-5)
    assert_matches_naive(dec, naive(W_dec, W_U), rtol=1e-4, atol_scale=1e-5)
    assert not torch.equal(enc.top_ids, dec.top_ids)


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_device_matches_naive(device, fused, dtype):
    # operands on the device (M stays there, D moves chunk by chunk); results come back to the CPU
    D, M = gaussian(37, 32, 2100, seed=15)
    result = K.token_score_stats(D.to(device, dtype), M.to(device, dtype), k=5, chunk_size=16, progress=False,
                                 fused=fused)
    assert result.top_ids.device.type == "cpu" and result.entropy.dtype == torch.float32
    if dtype == torch.float32:
        assert_matches_naive(result, naive(D, M), rtol=1e-4, atol_scale=1e-5)
    else:  # the device's bf16 product may round differently from the CPU's: bf16 tolerances
        assert_matches_naive(result, naive(D, M, dtype), rtol=2e-2, atol_scale=1e-2)


def test_fused_path_compiles_here_and_is_chosen_for_large_calls(monkeypatch):
    # The fused reduction must really run compiled on this machine (a silent fallback would hide a slow path).
    D, M = gaussian(6, 8, 400, seed=13)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        K.token_score_stats(D, M, k=3, progress=False, fused=True)
    assert K._COMPILED["moments"] is not None
    chosen = []
    monkeypatch.setattr(K, "_fused_moments_and_entropy", lambda S, smax: chosen.append(True))  # None: eager
    monkeypatch.setattr(K, "_FUSE_MIN_SCORES", 6 * 400)
    K.token_score_stats(D[:5], M, k=3, progress=False)  # 2,000 scores: eager
    assert not chosen
    K.token_score_stats(D, M, k=3, progress=False)  # 2,400 scores: fused
    assert chosen


def test_fused_path_falls_back_to_eager_once_with_a_warning(monkeypatch):
    calls = []

    def failing(S, smax):
        calls.append(1)
        raise RuntimeError("InductorError: C++ compile error")

    monkeypatch.setitem(K._COMPILED, "moments", failing)
    D, M = gaussian(9, 16, 500, seed=14)
    with pytest.warns(RuntimeWarning, match="torch.compile failed.*eagerly"):
        result = K.token_score_stats(D, M, k=3, chunk_size=4, progress=False, fused=True)
    assert calls == [1] and K._COMPILED["moments"] is None  # not retried for the next chunks
    assert_matches_naive(result, naive(D, M), rtol=1e-4, atol_scale=1e-5)


def test_chunks_never_exceed_the_requested_or_budgeted_size(monkeypatch):
    seen = []
    original = K._chunk_stats

    buffers = set()

    def recording(D_chunk, M, k, **kwargs):
        seen.append(D_chunk.shape[0])
        assert kwargs["out"].shape == (D_chunk.shape[0], M.shape[1])  # the chunk's rows of the buffer
        assert kwargs["out"].stride() == (256, 1)  # 250 scores a row, rows on 64-byte lines
        buffers.add(kwargs["out"].data_ptr())
        return original(D_chunk, M, k, **kwargs)

    monkeypatch.setattr(K, "_chunk_stats", recording)
    D, M = gaussian(20, 8, 250, seed=10)
    result = K.token_score_stats(D, M, k=2, chunk_size=6, progress=False)
    assert seen == [6, 6, 6, 2]
    assert len(buffers) == 1  # on a CPU every chunk's scores go into one buffer
    assert_matches_naive(result, naive(D, M), rtol=1e-4, atol_scale=1e-5)

    sizes = []
    for budget in (10_000, 20_000):  # automatic size: a few rows' working set (250 fp32 scores a row)
        seen.clear()
        monkeypatch.setattr(streaming, "memory_budget", lambda device: budget)
        K.token_score_stats(D, M, k=2, progress=False)
        assert sum(seen) == 20 and len(set(seen[:-1])) == 1
        sizes.append(seen[0])
    assert 1 < sizes[0] < 20 and sizes[1] in (2 * sizes[0], 2 * sizes[0] + 1)


@pytest.mark.parametrize("dtype, cols, ld", [(torch.float32, 250, 256), (torch.float32, 256, 256),
                                              (torch.bfloat16, 50257, 50272), (torch.float64, 3, 8)])
def test_scores_buffer_rows_start_on_64_byte_lines(dtype, cols, ld):
    buf = streaming.scores_buffer(5, cols, dtype)
    assert buf.shape == (5, cols) and buf.dtype == dtype and buf.stride() == (ld, 1)
    assert (buf.stride(0) * buf.element_size()) % 64 == 0
    torch.matmul(torch.ones(5, 2, dtype=dtype), torch.ones(2, cols, dtype=dtype), out=buf)  # written in place
    assert buf.stride() == (ld, 1) and bool((buf == 2).all())


def test_two_stage_topk_on_rows_further_apart_than_their_length(monkeypatch):
    S = streaming.scores_buffer(6, 1500)
    S.copy_(torch.randn(6, 1500, generator=torch.Generator().manual_seed(3)))
    widths, topk = [], torch.topk
    monkeypatch.setattr(torch, "topk", lambda x, k, **kw: widths.append(x.shape[-1]) or topk(x, k, **kw))
    for largest in (True, False):
        scores, ids = K.topk_rows(S, 5, largest=largest)
        ref = topk(S.contiguous(), 5, dim=1, largest=largest)
        assert torch.equal(scores, ref.values) and torch.equal(ids, ref.indices)
    assert max(widths) < 1500  # the two stages ran; no whole-row torch.topk on the strided rows


@pytest.mark.parametrize(
    "error",
    [
        getattr(torch, "OutOfMemoryError", RuntimeError)("CUDA out of memory. Tried to allocate 1 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory"),
    ],
)
def test_out_of_memory_halves_the_chunk_and_retries(monkeypatch, error):
    seen = []
    original = K._chunk_stats

    def flaky(D_chunk, M, k, **kwargs):
        seen.append(D_chunk.shape[0])
        if D_chunk.shape[0] > 4:
            raise error
        return original(D_chunk, M, k, **kwargs)

    monkeypatch.setattr(K, "_chunk_stats", flaky)
    D, M = gaussian(30, 16, 1300, seed=11)
    result = K.token_score_stats(D, M, k=3, chunk_size=24, progress=False)
    assert seen == [24, 12, 6] + [3] * 10  # halved until it fits, then kept
    assert_matches_naive(result, naive(D, M), rtol=1e-4, atol_scale=1e-5)


def test_out_of_memory_on_a_single_feature_is_a_clear_error(monkeypatch):
    def always_oom(D_chunk, M, k, **kwargs):
        raise RuntimeError("CUDA out of memory.")

    monkeypatch.setattr(K, "_chunk_stats", always_oom)
    D, M = gaussian(4, 8, 100)
    with pytest.raises(RuntimeError, match="single feature"):
        K.token_score_stats(D, M, chunk_size=4, progress=False)


def test_other_errors_are_not_retried(monkeypatch):
    def broken(D_chunk, M, k, **kwargs):
        raise RuntimeError("mat1 and mat2 must have the same dtype")

    monkeypatch.setattr(K, "_chunk_stats", broken)
    D, M = gaussian(4, 8, 100)
    with pytest.raises(RuntimeError, match="same dtype"):
        K.token_score_stats(D, M, chunk_size=4, progress=False)


def test_shape_errors_say_what_to_do():
    D, M = gaussian(4, 8, 100)
    with pytest.raises(ValueError, match="transposed"):
        K.token_score_stats(D, M.T.contiguous()[:, :8], progress=False)
    with pytest.raises(ValueError, match=r"\[d_model, d_vocab\]"):
        K.token_score_stats(D, M[:5], progress=False)
    with pytest.raises(ValueError, match="k must be"):
        K.token_score_stats(D, M, k=101, progress=False)
    with pytest.raises(ValueError, match="Expected D"):
        K.token_score_stats(D[0], M, progress=False)


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_parameters_that_require_grad_are_read_without_autograd(fused):
    # sae-lens SAEs hold their weights as nn.Parameters: the kernel must take them as they are
    D, M = gaussian(7, 8, 300, seed=17)
    result = K.token_score_stats(torch.nn.Parameter(D), torch.nn.Parameter(M), k=3, progress=False, fused=fused)
    assert not result.entropy.requires_grad and len(result.to_frame()) == 7
    assert_matches_naive(result, naive(D, M), rtol=1e-4, atol_scale=1e-5)
    E = torch.nn.Parameter(M.T.contiguous())  # [d_vocab, d_model] embeddings
    assert not K.mean_pairwise_cosine(result.top_ids, E).requires_grad


def test_progress_bar_and_empty_input():
    D, M = gaussian(5, 8, 100)
    assert len(K.token_score_stats(D, M, k=2, chunk_size=2, progress=True)) == 5
    empty = K.token_score_stats(D[:0], M, k=2, progress=False)
    assert empty.top_ids.shape == (0, 2) and len(empty.to_frame()) == 0


def test_progress_bars_are_silenced_like_progress_lines(monkeypatch):
    # under nbval (WEIGHTSCOPE_PROGRESS=0) a bar would be a widget output the stored page does not have
    from weightscope.compute.streaming import NoBar, progress_bar

    monkeypatch.delenv("WEIGHTSCOPE_PROGRESS", raising=False)  # whatever the shell running the tests set
    bar = progress_bar(3, True)
    assert not isinstance(bar, NoBar)
    assert bar.leave is False  # a kernel runs several times a layer: its finished bars must not pile up
    bar.close()
    monkeypatch.setenv("WEIGHTSCOPE_PROGRESS", "0")
    assert isinstance(progress_bar(3, True), NoBar)


def test_line_bar_prints_one_line_per_interval_across_bars_and_none_for_short_work(monkeypatch, capsys):
    from weightscope.compute import streaming

    clock = [100.0]
    monkeypatch.setattr(streaming.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(streaming.LineBar, "last_line", 100.0)
    monkeypatch.setenv("WEIGHTSCOPE_PROGRESS", streaming.LINES)
    bar = streaming.progress_bar(16384, True, "token scores")
    assert isinstance(bar, streaming.LineBar) and bar.every == streaming.LINE_EVERY_S
    for step in (4.0, 4.0, 4.0, 4.0, 30.0):  # updates at 4, 8, 12, 16 and 46 s
        clock[0] += step
        bar.update(2048)
    bar.close()
    assert capsys.readouterr().err.splitlines() == [
        "[progress] token scores: 6,144/16,384 features (38%), 12 s, about 20 s left",
        "[progress] token scores: 10,240/16,384 features (62%), 46 s, about 28 s left"]
    short = streaming.progress_bar(10, True, "head reads", unit="row")
    clock[0] += 9.9  # 9.9 s since the last line: nothing
    short.update(10)
    assert capsys.readouterr().err == ""
    after = streaming.progress_bar(4, True, "null scores", unit="direction")
    clock[0] += 0.2  # a second short step, 10.1 s after the last line: the run of short steps is reported
    after.update(1)
    assert capsys.readouterr().err == "[progress] null scores: 1/4 directions (25%), 0 s, about 1 s left\n"
    monkeypatch.setenv("WEIGHTSCOPE_PROGRESS", "0")
    assert isinstance(streaming.progress_bar(10, True), streaming.NoBar)


def test_a_line_bar_counts_every_update_from_threads_side_by_side(monkeypatch):
    # chapter 3's bootstraps run in threads and tick one bar
    from concurrent.futures import ThreadPoolExecutor

    from weightscope.compute import streaming

    bar = streaming.LineBar(40_000, "bootstraps", "resample", every=1e9)  # no line: the count only
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: [bar.update(1) for _ in range(10_000)], range(4)))
    assert bar.n == 40_000


def test_the_one_off_compile_is_announced_once_in_the_runners_lines(monkeypatch, capsys):
    # the first fused call compiles for tens of seconds on a small CPU: no bar counts it, so a line says so
    from weightscope.compute import streaming

    monkeypatch.setattr(K, "_COMPILED", {})
    monkeypatch.setattr(K.torch, "compile", lambda fn, **kw: fn)  # the announcement, not the compile
    monkeypatch.setenv("WEIGHTSCOPE_PROGRESS", streaming.LINES)
    D, M = gaussian(4, 8, 100)
    for _ in range(2):
        K.token_score_stats(D, M, k=2, fused=True, progress=False)
    assert capsys.readouterr().err.count("[progress] compiling the fused score statistics") == 1
    monkeypatch.setattr(K, "_COMPILED", {})
    monkeypatch.setenv("WEIGHTSCOPE_PROGRESS", "1")  # a notebook run by hand: its bars say enough
    K.token_score_stats(D, M, k=2, fused=True, progress=False)
    assert capsys.readouterr().err == ""


def test_stats_frame_is_tidy():
    D, M = gaussian(6, 8, 120, seed=12)
    result = K.token_score_stats(D, M, k=3, progress=False)
    frame = K.stats_frame(result, feature_ids=[10, 11, 12, 13, 14, 15])
    assert list(frame.columns) == ["feature", *STATS, "top_ids", "top_scores", "bottom_ids", "bottom_scores"]
    assert frame["feature"].tolist() == [10, 11, 12, 13, 14, 15]
    assert frame.loc[2, "top_ids"] == result.top_ids[2].tolist() and len(frame.loc[2, "bottom_scores"]) == 3
    # list columns are Arrow-backed (a column of Python lists costs ~7x the memory at real width)
    assert all(isinstance(frame[c].dtype, pd.ArrowDtype) for c in ("top_ids", "bottom_scores"))
    assert frame["entropy"].to_numpy() == pytest.approx(result.entropy.numpy())
    assert result.to_frame()["feature"].tolist() == list(range(6))
    with pytest.raises(ValueError, match="one id per row"):
        K.stats_frame(result, feature_ids=[1, 2])


# ---------------------------------------------------------------------------------------------------------
# fold_norm
# ---------------------------------------------------------------------------------------------------------


def test_fold_norm_scales_rows():
    g = torch.Generator().manual_seed(13)
    w, W = torch.randn(6, generator=g), torch.randn(6, 40, generator=g)
    torch.testing.assert_close(folding.fold_norm(w, W, plus_one=False), torch.diag(w) @ W)
    torch.testing.assert_close(folding.fold_norm(w, W, plus_one=True), torch.diag(1 + w) @ W)
    assert folding.fold_norm(w, W.bfloat16(), plus_one=True).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="W_U"):
        folding.fold_norm(w, W.T, plus_one=True)


# ---------------------------------------------------------------------------------------------------------
# Token coherence
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ("kitten", "sitting", 3 / 7),
        ("sitting", "kitten", 3 / 7),
        ("flaw", "lawn", 2 / 4),
        ("abc", "abc", 0.0),
        ("abc", "", 1.0),
        ("", "", 0.0),
        ("ab", "cd", 1.0),
        ("the", " the", 1 / 4),  # normalized_levenshtein itself does not strip
    ],
)
def test_normalized_levenshtein(a, b, expected):
    assert K.normalized_levenshtein(a, b) == pytest.approx(expected)


def naive_levenshtein(a: str, b: str) -> int:
    """Edit distance by the full dynamic-programming table (the textbook recurrence)."""
    table = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = min(table[i - 1][j] + 1, table[i][j - 1] + 1,
                              table[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return table[-1][-1]


def test_normalized_levenshtein_matches_the_dynamic_programming_table():
    rng = np.random.default_rng(3)
    alphabet = list("abcde ▁Ġé日")  # few letters: many shared characters; non-ASCII included
    for _ in range(300):
        a, b = ("".join(rng.choice(alphabet, size=rng.integers(0, 9))) for _ in range(2))
        expected = naive_levenshtein(a, b) / max(len(a), len(b), 1)
        assert K.normalized_levenshtein(a, b) == pytest.approx(expected, abs=1e-12), (a, b)


def test_mean_pairwise_string_similarity():
    assert K.mean_pairwise_string_similarity(["▁Paris", " paris", "PARIS", "Ġparis"]) == pytest.approx(1.0)
    assert K.mean_pairwise_string_similarity(["cat", "dog"]) == pytest.approx(0.0)
    assert K.mean_pairwise_string_similarity(["kitten", "▁sitting"]) == pytest.approx(1 - 3 / 7)
    # three pairs: (a, a) = 1, (a, b) = 0, (a, b) = 0
    assert K.mean_pairwise_string_similarity(["ab", "▁ab", "xy"]) == pytest.approx(1 / 3)
    assert math.isnan(K.mean_pairwise_string_similarity(["alone"]))


def test_mean_pairwise_cosine_matches_double_loop():
    g = torch.Generator().manual_seed(14)
    E = torch.randn(50, 12, generator=g)
    E[7] = 0.0  # a zero embedding: cosine 0 with everything
    ids = torch.randint(0, 50, (9, 5), generator=g)
    ids[0] = torch.tensor([3, 3, 3, 3, 3])  # identical tokens: mean cosine 1
    ids[1, :2] = 7
    expected = torch.empty(9, dtype=torch.float64)
    for f in range(9):
        values = []
        for a in range(5):
            for b in range(5):
                if a != b:
                    u, v = E[ids[f, a]].double(), E[ids[f, b]].double()
                    denom = u.norm() * v.norm()
                    values.append(float(u @ v / denom) if denom > 0 else 0.0)
        expected[f] = sum(values) / len(values)
    got = K.mean_pairwise_cosine(ids, E, chunk_size=4)
    assert got.shape == (9,) and got.device.type == "cpu"
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    assert got[0] == pytest.approx(1.0, abs=1e-6)


def test_mean_pairwise_cosine_rejects_bad_input():
    E = torch.randn(10, 4)
    with pytest.raises(ValueError, match="at least 2"):
        K.mean_pairwise_cosine(torch.zeros(3, 1, dtype=torch.int64), E)
    with pytest.raises(ValueError, match="token ids"):
        K.mean_pairwise_cosine(torch.full((3, 2), 10), E)


# ---------------------------------------------------------------------------------------------------------
# Null baselines
# ---------------------------------------------------------------------------------------------------------


def test_random_directions_keep_row_norms_and_are_deterministic():
    D, _ = gaussian(40, 16, 1, seed=15)
    D = D * torch.linspace(0.1, 5, 40)[:, None]
    R = K.random_directions_like(D, seed=0)
    assert R.shape == D.shape and R.dtype == D.dtype
    torch.testing.assert_close(R.norm(dim=1), D.norm(dim=1))
    assert torch.equal(R, K.random_directions_like(D, seed=0))
    assert not torch.equal(R, K.random_directions_like(D, seed=1))
    cos = torch.nn.functional.cosine_similarity(R, D, dim=1)
    assert cos.abs().mean() < 0.5  # new directions, not D again
    assert K.random_directions_like(D.bfloat16(), seed=0).dtype == torch.bfloat16


def test_shuffled_rows_permute_each_row_independently():
    D = torch.arange(16.0).repeat(30, 1) + torch.arange(30.0)[:, None] * 100
    P = K.shuffled_rows(D, seed=0)
    assert torch.equal(P.sort(dim=1).values, D)  # same values in every row
    torch.testing.assert_close(P.norm(dim=1), D.norm(dim=1))
    assert not torch.equal(P, D)
    orders = {tuple((row - row.min()).long().tolist()) for row in P}
    assert len(orders) > 1  # not one permutation shared by all rows
    assert torch.equal(P, K.shuffled_rows(D, seed=0))
    assert not torch.equal(P, K.shuffled_rows(D, seed=1))


# ----------------------------------------------------------------------------------------------------------
# Content tokens (the token filter of chapter 1)
# ----------------------------------------------------------------------------------------------------------


class _HandTokenizer:
    """A hand-built vocabulary with the three kinds of entries: content, byte pieces, special tokens."""

    def __init__(self, pieces, special_ids, added=None):
        self.pieces, self.all_special_ids = pieces, special_ids
        self.added_tokens_decoder = added or {}

    def __len__(self):
        return len(self.pieces)

    def convert_ids_to_tokens(self, ids):
        return [self.pieces[i] for i in ids]

    def batch_decode(self, rows, clean_up_tokenization_spaces=False):
        return [self.pieces[r[0]].replace("▁", " ") if not self.pieces[r[0]].startswith("<0x")
                else "\ufffd" for r in rows]


def test_token_categories_on_a_hand_built_vocabulary():
    from types import SimpleNamespace

    from weightscope.compute.token_scores import content_token_ids, token_categories

    pieces = ["<pad>", "<bos>", "<0x0A>", "<0xFF>", "▁the", "▁cat", "<start_of_turn>", "<unused7>", "ing", "!"]
    added = {6: SimpleNamespace(special=True), 8: SimpleNamespace(special=False)}
    tok = _HandTokenizer(pieces, special_ids=[0, 1], added=added)
    cats = token_categories(tok, d_vocab=12)  # two padding rows of W_U past the tokenizer
    assert cats == ["special", "special", "byte", "byte", "content", "content", "special", "special", "content",
                    "content", "special", "special"]
    assert content_token_ids(cats).tolist() == [4, 5, 8, 9]
    assert content_token_ids(cats, exclude=("special",)).tolist() == [2, 3, 4, 5, 8, 9]
    assert content_token_ids(cats, exclude=()).tolist() == list(range(12))
    with pytest.raises(ValueError, match="unknown token kinds"):
        content_token_ids(cats, exclude=("bytes",))


def test_token_categories_of_gpt2_byte_level_bpe():
    import json

    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from weightscope.compute.token_scores import token_categories

    folder = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "gpt2"
    if not (folder / "vocab.json").exists():
        pytest.skip(f"no GPT-2 vocabulary at {folder}")
    vocab = json.loads((folder / "vocab.json").read_text())
    merges = [tuple(line.split()) for line in (folder / "merges.txt").read_text().splitlines()
              if line and not line.startswith("#")]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    cats = token_categories(tok, 50257)
    assert cats[50256] == "special" and cats.count("special") == 1
    # bytes 0x80..0xFF alone are not UTF-8; their single-byte tokens are "byte", ASCII ones are content
    assert cats[vocab["¡"]] == "byte" and cats[vocab["a"]] == "content" and cats[vocab["Ġthe"]] == "content"
    expected_bytes = sum(1 for i in range(50256) if "\ufffd" in tok.decode([i]))
    assert cats.count("byte") == expected_bytes > 128


def test_token_categories_of_the_demo_vocabulary():
    from weightscope.compute.token_scores import token_categories
    from weightscope.load.models import stories260k_tokenizer

    try:
        tok = stories260k_tokenizer()
    except Exception as err:  # the demo model folder is not here
        pytest.skip(f"no demo tokenizer: {err}")
    cats = token_categories(tok, 512)
    pieces = tok.convert_ids_to_tokens(list(range(512)))
    assert cats[:3] == ["special"] * 3  # <unk>, <s>, </s>
    assert cats.count("byte") == sum(1 for p in pieces if p.startswith("<0x") and len(p) == 6) == 256
    assert cats.count("content") == 512 - 3 - 256
