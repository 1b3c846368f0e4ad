"""The benchmark harness: it finds the benchmark files, each declares what the runner needs, results files
render as tables, and a standalone script is listed but neither imported nor run. (No timings here: those
belong in bench/ runs.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import harness  # noqa: E402
import run as runner  # noqa: E402


def test_every_benchmark_file_declares_name_plans_run_and_table():
    modules, _ = harness.discover()
    names = [m.NAME for m in modules]
    assert {"kernel", "memory", "chapter1", "attention", "loading"} <= set(names)
    assert len(names) == len(set(names))
    for m in modules:
        assert set(m.PLANS) == {(d, q) for d in ("cpu", "cuda") for q in (False, True)}, m.NAME
        assert callable(m.run) and callable(m.table) and m.__doc__, m.NAME


def _harness_results() -> list:
    """Results files written by run.py (standalone benchmarks such as bench_ffkv.py keep formats of their own)."""
    return [p for p in sorted((BENCH / "results").glob("*.json")) if "schema" in json.loads(p.read_text())]


@pytest.mark.parametrize("path", _harness_results(), ids=lambda p: p.name)
def test_stored_results_render_as_tables(path):
    report = json.loads(path.read_text())
    text = runner.tables(report)
    assert text.startswith("Device: ")
    for name in report["results"]:
        assert f"({name}: no benchmark file renders it)" not in text
    assert text.count("|---") >= len(report["results"])


def test_a_script_without_the_harness_contract_is_standalone_and_not_imported(tmp_path):
    script = tmp_path / "bench_script.py"
    script.write_text("raise SystemExit('imported')\n")
    contract = tmp_path / "bench_tiny.py"
    contract.write_text("NAME = 'tiny'\nPLANS = {}\ndef run(ctx):\n    return {}\n"
                        "def table(result, report):\n    return ''\n")
    assert not harness._is_harness_benchmark(script)
    assert harness._is_harness_benchmark(contract)


def test_unknown_benchmark_names_are_a_clear_error():
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--only", "kernel,nonesuch"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown benchmark(s) ['nonesuch']" in proc.stderr and "Traceback" not in proc.stderr


def test_book_extrapolation_scales_one_depth_and_fits_a_line_through_two():
    import bench_book

    dims = dict(d_model=8, n_heads=2, n_kv=2, d_head=4, d_vocab=50, n_layers=1, d_mlp=32)
    result = {"n_layers": 1, "date": "2026-12-04", "dims": dims, "saes": {"d_sae": 16, "d_sae_att": 16, "res_hook": "hook_resid_pre"},
              "chapters": {stem: {"rc": 0, "cpu_s": 10.0, "page_mb": 0.1} for stem in bench_book.CHAPTER_STEMS}}
    rows = {line.split(" | ")[0].strip("| "): line for line in
            bench_book.extrapolate([result], 4).splitlines()[2:]}
    ratio = (bench_book.chapter_flops("02_attention", {**dims, "n_layers": 4}, 16, 16, 0)
             / bench_book.chapter_flops("02_attention", dims, 16, 16, 0))
    assert ratio > 4  # reads grow as L(L+1)/2: faster than the layers
    # chapters 0 and 5 load the model: their seconds grow with its bytes (embeddings fixed, blocks per layer)
    emb, attn, mlp = 2 * 50 * 8, 8 * (2 * 2 + 2 * 2) * 4, 2 * 8 * 32  # (un)embedding; per block
    full = lambda L: emb + L * (attn + mlp)
    grow = (emb + 4 * attn + full(4)) / (emb + attn + full(1))  # chapter 0: weights-only and full model
    assert 1 < grow < 4
    assert rows["00_demo_model"].endswith(f"| {10 * grow:,.0f} | scaled (upper bound) |")
    assert rows["05_context_neurons"].endswith(f"| {10 * full(4) / full(1):,.0f} | scaled (upper bound) |")
    assert rows["01_output_tokens"].endswith("| 40 | scaled (upper bound) |")
    assert rows["02_attention"].endswith(f"| {10 * ratio:,.0f} | scaled (upper bound) |")
    skip = {**result, "chapters": {**result["chapters"], "06_ffkv_baseline": {"rc": 0, "cpu_s": 8.0, "page_mb": None}}}
    assert "| 06_ffkv_baseline | flops | – | – | not measured | |" in bench_book.extrapolate([skip], 4)  # skipped
    # resid_pre of block 0 sees no MLP block: chapter 6 has no work at one layer, so nothing to scale from
    assert "| 06_ffkv_baseline | flops | – | – | not measured | |" in bench_book.extrapolate([result], 4)
    # a second depth splits start-up from per-layer work: 10 s at 1 layer, 16 s at 2 -> 4 + 6 L
    deeper = {**result, "n_layers": 2, "dims": {**dims, "n_layers": 2},
              "chapters": {stem: {"rc": 0, "cpu_s": 16.0, "page_mb": 0.1} for stem in bench_book.CHAPTER_STEMS}}
    rows = {line.split(" | ")[0].strip("| "): line for line in
            bench_book.extrapolate([deeper, result], 4).splitlines()[2:]}
    assert rows["01_output_tokens"].endswith("| 1 and 2 | 10 and 16 | 28 | line through both depths |")
    assert rows["04_attention_saes"].endswith("| 28 | line through both depths |")
    two = bench_book.chapter_flops("02_attention", {**dims, "n_layers": 2}, 16, 16, 0)
    four = bench_book.chapter_flops("02_attention", {**dims, "n_layers": 4}, 16, 16, 0)
    one = four / ratio
    assert rows["02_attention"].endswith(f"| {10 + 6 * (four - one) / (two - one):,.0f} | line through both depths |")


def test_book_memory_at_another_depth_keeps_each_chapters_measured_overhead():
    import bench_book

    dims = dict(d_model=8, n_heads=2, n_kv=2, d_head=4, d_vocab=50, n_layers=2, d_mlp=32, mlp_mats=2)
    result = {"n_layers": 2, "date": "2026-12-07", "dims": dims, "baseline_rss_gb": 0.5,
              "saes": {"d_sae": 16, "d_sae_att": 16, "res_hook": "hook_resid_pre"},
              "chapters": {"01_output_tokens": {"rc": 0, "peak_rss_gb": 3.0, "page_mb": 0.1},
                           "03_semantic_populations": {"rc": 0, "peak_rss_gb": 1.5, "tables_gb": 0.4,
                                                       "page_mb": 0.1},
                           "05_context_neurons": {"rc": 0, "peak_rss_gb": 0.0, "page_mb": None}}}
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[2:] for line in
            bench_book.memory_at([result], 6).splitlines()[2:]}
    weights = lambda L: 4 * (2 * 50 * 8 + L * 8 * 16 * 4)  # embedding, unembedding, attention per block
    ch1 = lambda L: (weights(L) + 4 * (2 * 8 * 16 + 2 * 8 * 50 + 2**30 / 4)) / 1e9 + 0.5
    assert [float(x) for x in rows["01_output_tokens"][:4]] == pytest.approx(
        [ch1(2), 3.0, 3.0 / ch1(2), ch1(6)], abs=0.006)
    assert float(rows["01_output_tokens"][4].strip(" |")) == pytest.approx(ch1(6) * 3.0 / ch1(2), abs=0.006)
    # chapter 3 holds its input tables, per layer: three times the layers, three times the tables
    assert float(rows["03_semantic_populations"][3]) == pytest.approx(1.2 + 0.5, abs=0.006)
    assert float(rows["03_semantic_populations"][4].strip(" |")) == pytest.approx(1.7 * 1.5 / 0.9, abs=0.006)
    assert len(rows) == 2  # chapters that did not run have no row
    # a chapter rerun at the same depth (given last) replaces its first run; a shallower run does not
    again = {**result, "file": "again",
             "chapters": {"01_output_tokens": {"rc": 0, "peak_rss_gb": 2.0, "page_mb": 0.1}}}
    shallow = {**bench_book.at_depth(result, 1), "file": "shallow"}
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in
            bench_book.memory_at([result, again, shallow], 6).splitlines()[2:]}
    assert rows["01_output_tokens"][0] == "again (L=2)" and float(rows["01_output_tokens"][2]) == 2.0
    assert rows["03_semantic_populations"][0] == " (L=2)"


def test_chapter_1_flops_count_the_rows_the_chapter_scores(monkeypatch):
    """The FLOP model's rows are what `analyse_sae` hands the kernel: counted on a tiny model, not
    restated."""
    import bench_book
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from weightscope.chapters import output_tokens
    from weightscope.compute import lens

    model = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=4, d_head=4, n_heads=2,
                                                      d_vocab=30, act_fn="gelu", normalization_type="RMS"))
    g = torch.Generator().manual_seed(0)
    sae = SimpleNamespace(d_sae=12, layer=0, W_enc=torch.randn(8, 12, generator=g),
                          W_dec=torch.randn(12, 8, generator=g))
    n_null, products = output_tokens.Config().n_null, []  # the chapter's own (cheap at 30 tokens)
    real = lens.token_score_stats
    monkeypatch.setattr(lens, "token_score_stats", lambda D, M, **kw: products.append(
        2 * D.shape[0] * D.shape[1] * M.shape[1]) or real(D, M, **kw))
    lens.analyse_sae(sae, model, lens.LensConfig(k=3, m_coherence=2), vocab=[f"t{i}" for i in range(30)],
                     n_null=n_null, seed=0)
    d = dict(d_model=8, n_heads=2, n_kv=2, d_head=4, d_vocab=30, n_layers=3, d_mlp=32)
    assert bench_book.chapter_flops("01_output_tokens", d, 12, None, 0) == 3 * sum(products)


def test_chapter_4_and_6_flops_count_each_product():
    import bench_book
    from weightscope.chapters import attention_saes, ffkv

    # chapter 4 at 3 layers, resid_pre SAEs: three write lenses; layers 0 and 1 have a residual SAE after them
    d = dict(d_model=8, n_heads=2, n_kv=1, d_head=4, d_vocab=50, n_layers=3, d_mlp=32)
    lens, reads = 3 * 12 * 8 * 50 * 2, 2 * (12 * 8 * 16 * 2) * 2  # d_sae_att 12, d_sae 16; features and null
    c4 = attention_saes.Config()
    text = c4.text_rows * c4.text_ctx + c4.induction_rows * (2 * c4.induction_len + 1)
    block = 2 * (8 * (2 * 2 + 2 * 1) * 4 + 2 * 8 * 32)  # per token: W_Q, W_O; W_K, W_V (1 kv head); 2 MLP mats
    text_passes = 3 * text * (2 * 4 * 12 * 2) + text * 3 * block  # each layer's encode; the 3 blocks once
    assert bench_book.chapter_flops("04_attention_saes", d, 16, 12, 0) == lens + reads + text_passes
    # an SAE wider than n_null_reads: the null keeps n_null_reads rows
    wide = c4.n_null_reads + 100
    lens, reads = 3 * wide * 8 * 50 * 2, 2 * ((wide + c4.n_null_reads) * 8 * 16 * 2)
    text_passes = 3 * text * (2 * 4 * wide * 2) + text * 3 * block
    assert bench_book.chapter_flops("04_attention_saes", d, 16, wide, 0) == lens + reads + text_passes

    d = dict(d_model=8, n_heads=2, n_kv=1, d_head=4, d_vocab=50, n_layers=2, d_mlp=32)
    n_null, d_sae = ffkv.Config().n_null, 16
    # resid_post at 2 layers: blocks 0 and 1 paired; one later read (block 0's by layer 1); pairs (0,0), (1,0), (1,1)
    lens = 2 * 2 * 32 * 8 * 50 * 2
    reads = 1 * (d_sae + 32 + 2 * n_null) * (8 * (2 + 2 * 1) * 4 + 2 * 4 * 4) * 2
    # the real pairs, then one null per side compared with each of the 2 blocks' (SAEs') sets once
    alignment = (3 + 2 * 2) * d_sae * 32 * 8 * 2
    # held-out checks per paired SAE: encode, decode, null selection (d_sae); latents, 2 decodes, null (d_mlp)
    n = ffkv.Config().n_eval_tokens
    checks = n * (3 * 8 * d_sae + 4 * 8 * 32) * 2
    total = lens + reads + alignment + 2 * checks + n * 2 * block
    assert bench_book.chapter_flops("06_ffkv_baseline", d, d_sae, None, 1) == total
    # resid_pre: block 0's SAE sees no MLP, block 1's sees block 0: one pair, read by layer 1; one set per side
    total = lens / 2 + reads + alignment * 3 / 7 + checks + n * 2 * block  # block 1 runs for its hook_resid_pre
    assert bench_book.chapter_flops("06_ffkv_baseline", d, d_sae, None, 0) == total


def test_chapter_7_flops_count_the_pass_and_each_ablation_once():
    import bench_book
    from weightscope.chapters import in_context

    d = dict(d_model=8, n_heads=2, n_kv=1, d_head=4, d_vocab=50, n_layers=3, d_mlp=32)
    c = in_context.Config()
    block = 2 * (8 * (2 * 2 + 2 * 1) * 4 + 2 * 8 * 32)
    passes = c.n_tokens * 3 * (block + 2 * 8 * 16)  # every block and every SAE's encode, per token
    # per SAE layer: the clean stream to its site and the ablated one after it, 3 blocks in all, on rows cut
    # after each position (row_len / 2 tokens on average)
    tokens = 3 * c.n_ablate * c.ablate_positions * c.row_len / 2
    # and the feature's activation at the site: one encoder column (ReLU, JumpReLU), the whole encoder (TopK)
    for arch, site in (("standard", 2 * 8), ("jumprelu", 2 * 8), ("topk", 2 * 8 * 16)):
        for hook_offset in (0, 1):
            got = bench_book.chapter_flops("07_in_context", d, 16, None, hook_offset, arch)
            assert got == passes + tokens * (3 * block + site), (arch, hook_offset)
    parts = bench_book.held("07_in_context", {"dims": d, "n_layers": 3, "chapters": {},
                                              "saes": {"d_sae": 16, "d_sae_att": None}})
    assert parts["final"] == 4 * c.n_tokens * 8  # the activation pass's final residual, fp32
    assert parts["sae_group"] == 4 * 3 * 2 * 8 * 16 and parts["streams"] == 0  # every SAE fits sae_memory_mb
    wide = {"d_sae": c.sae_memory_mb * 2**20 // 64, "d_sae_att": None}  # one fp32 SAE fills it
    big = bench_book.held("07_in_context", {"dims": d, "n_layers": 3, "chapters": {}, "saes": wide})
    assert big["sae_group"] == c.sae_memory_mb * 2**20  # one SAE (fp32) a group, as `sae_groups` splits them
    assert big["streams"] == 4 * c.n_tokens * 8  # and each batch's residual waits between the groups


def test_book_floor_runs_every_product_at_the_best_rate_of_the_run():
    import bench_book

    dims = dict(d_model=8, n_heads=2, n_kv=2, d_head=4, d_vocab=50, n_layers=1, d_mlp=32)
    result = {"n_layers": 1, "dims": dims, "machine": {"cpus": 2},
              "saes": {"d_sae": 16, "d_sae_att": 16, "res_hook": "hook_resid_pre"},
              "chapters": {"00_demo_model": {"rc": 0, "cpu_s": 3.0, "wall_s": 5.0, "page_mb": 0.1},
                           "01_output_tokens": {"rc": 0, "cpu_s": 2.0, "wall_s": 1.5, "page_mb": 0.1},
                           "02_attention": {"rc": 0, "cpu_s": 8.0, "wall_s": 6.0, "page_mb": 0.1}}}
    f1, f2 = (bench_book.run_flops(s, result) for s in ("01_output_tokens", "02_attention"))
    best = max(f1 / 2.0, f2 / 8.0)  # FLOPs per CPU second of the faster chapter
    rows = {line.split(" | ")[0].strip("| "): line for line in bench_book.floor(result).splitlines()[4:]}
    assert rows["00_demo_model"].endswith("| 5 | 5 |")  # no FLOP model: its wall time as it ran
    assert rows["02_attention"].endswith(f"| 6 | {f2 / (best * 2):,.0f} |")
    total = 5.0 + f1 / (best * 2) + f2 / (best * 2)
    assert rows["all"].endswith(f"| {total:,.0f} ({total / 60:.1f} min) |")


def test_book_floor_counts_the_runners_time_outside_the_chapters():
    import bench_book

    dims = dict(d_model=8, n_heads=2, n_kv=2, d_head=4, d_vocab=50, n_layers=1, d_mlp=32)
    result = {"n_layers": 1, "date": "today", "dims": dims, "machine": {"cpus": 2},
              "run": {"rc": 0, "wall_s": 20.0, "cpu_s": 9.0},
              "saes": {"d_sae": 16, "d_sae_att": 16, "res_hook": "hook_resid_pre"},
              "chapters": {"00_demo_model": {"rc": 0, "cpu_s": 3.0, "wall_s": 5.0, "page_mb": 0.1,
                                             "peak_rss_gb": 1},
                           "01_output_tokens": {"rc": 0, "cpu_s": 2.0, "wall_s": 7.0, "page_mb": 0.1,
                                                "peak_rss_gb": 1}}}
    f1 = bench_book.run_flops("01_output_tokens", result)
    rows = {line.split(" | ")[0].strip("| "): line for line in bench_book.floor(result).splitlines()[4:]}
    assert rows["the runner outside the chapters"].endswith("| – | 8 | 8 |")  # 20 - 5 - 7
    at_best = 5.0 + f1 / (f1 / 2.0 * 2) + 8.0
    assert rows["all"].endswith(f"| 20 (0.3 min) | {at_best:,.0f} ({at_best / 60:.1f} min) |")
    assert "| whole run (wall s · CPU s) | 20 · 9 |" in bench_book.table([result])


def test_book_bench_reads_the_runners_chapter_lines(monkeypatch, capsys):
    """The benchmark times each chapter between the lines the book runner prints around it."""
    import types

    import bench_book

    from weightscope.publish import book

    monkeypatch.setattr(book, "_prepare", lambda target: None)
    monkeypatch.setattr(book, "_set_run_status", lambda *a: None)
    monkeypatch.setattr(book, "execute_chapter", lambda target, source, **kw: "executed")
    book._run_chapters(types.SimpleNamespace(target="realwidth-gpt2"), [Path("02_attention.md")], None, False)
    start, end = capsys.readouterr().out.splitlines()
    assert bench_book.START.match(start).group(1) == "02_attention"
    assert bench_book.END.match(end).group(1) == "02_attention"
    assert not bench_book.START.match(end) and not bench_book.END.match(start)


def test_book_memory_table_sets_peak_rss_beside_what_each_chapter_holds():
    import bench_book

    dims = dict(d_model=8, n_heads=2, n_kv=2, d_head=4, d_vocab=50, n_layers=2)
    result = {"n_layers": 2, "dims": dims, "baseline_rss_gb": 0.5,
              "saes": {"d_sae": 16, "d_sae_att": 16, "res_hook": "hook_resid_pre"},
              "chapters": {"01_output_tokens": {"rc": 0, "peak_rss_gb": 3.0, "page_mb": 0.1},
                           "06_ffkv_baseline": {"rc": 0, "peak_rss_gb": 0.4, "page_mb": None}}}
    parts = bench_book.held("01_output_tokens", result)
    assert parts["weights"] == 4 * (2 * 50 * 8 + 2 * 8 * 8 * 4) and parts["sae"] == 4 * 2 * 8 * 16
    assert parts["sides"] == 4 * 2 * 8 * 50  # the lens's two [d_model x vocabulary] matrices, gathered once
    assert parts["chunk"] == 2**30  # the streaming budget dominates at this size
    rows = bench_book.memory_table(result).splitlines()
    expected = sum(parts.values()) / 1e9 + 0.5
    assert len(rows) == 3 and rows[2].endswith(f"| {expected:.2f} | 3.00 | {3.0 / expected:.2f} |")  # 06 skipped
    # chapter 3 holds its input tables, measured in the run; runs made before that say so
    tables = {"rc": 0, "peak_rss_gb": 0.9, "page_mb": 0.1, "tables_gb": 0.2}
    with_tables = {**result, "chapters": {"03_semantic_populations": tables}}
    assert bench_book.memory_table(with_tables).splitlines()[2] == (
        "| 03_semantic_populations | tables 0.20 | 0.5 | 0.70 | 0.90 | 1.29 |")
    older = {**result, "chapters": {"03_semantic_populations": {k: v for k, v in tables.items()
                                                                 if k != "tables_gb"}}}
    assert "| tables not measured | 0.5 | 0.50 |" in bench_book.memory_table(older)


def test_chapter_3_tables_are_measured_as_the_chapter_reads_them(tmp_path, monkeypatch):
    import bench_book

    from weightscope import io
    from weightscope.compute import populations

    monkeypatch.setenv("WEIGHTSCOPE_DATA", str(tmp_path / "data"))
    n = 20_000
    lists = [[f" w{i}-{j}" for j in range(10)] for i in range(n)]  # 200,000 distinct short strings
    columns = {c: lists if c.endswith("top_tokens") else 0.5 for c in populations.label_columns()}
    features = pd.DataFrame({**columns, "layer": 0, "feature": range(n)})
    io.save_table(features, "t", "01_features", key="k", params={})
    io.save_table(features[["layer", "feature"]].assign(q_z_mean=0.0), "t", "02_features", key="k", params={})
    (tmp_path / "t.yaml").write_text("target: t\n")
    lib = str(BENCH.parent / "lib")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [lib, os.environ.get("PYTHONPATH")]))}
    assert 0.01 < bench_book.tables_rss_gb(tmp_path / "t.yaml", env) < 0.3  # two columns of 200,000 strings


def test_a_failing_benchmark_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    import types

    def module(name, run):
        m = types.ModuleType(f"bench_{name}", name)
        m.NAME, m.run = name, run
        m.PLANS = {(d, q): {} for d in ("cpu", "cuda") for q in (False, True)}
        m.table = lambda result, report: f"| {name} |\n|---|\n"
        return m

    def broken(ctx):
        raise ValueError("planted")

    monkeypatch.setattr(runner.harness, "discover",
                        lambda: ([module("broken", broken), module("fine", lambda ctx: {"x": 1})], []))
    out = tmp_path / "results.json"
    assert runner.main(["--quick", "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["complete"] and report["results"] == {"fine": {"x": 1}}
    assert report["errors"] == {"broken": "ValueError: planted"}
    assert "**broken: failed** (ValueError: planted)" in runner.tables(report, [])


def test_book_peaks_leave_out_processes_alive_at_a_chapters_start():
    """The previous chapter's kernel may still be exiting when the next chapter starts: after `mark`, the
    peak counts the root and new processes only (and without a mark it counts the old child)."""
    import time

    import bench_book

    code = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', "
            "'import time; b = bytearray(300 * 2**20); b[::4096] = b\"x\" * len(b[::4096]); time.sleep(30)'])\n"
            "time.sleep(30)\n")
    root = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(2.0)  # the child holds its 300 MB by now
        peak = bench_book.TreePeak(root.pid, interval=0.05)
        time.sleep(0.5)
        assert peak.max_one > 250e6  # the child, before any mark
        peak.mark()
        time.sleep(0.5)
        assert peak.max_one < 150e6 and peak.max_sum < 150e6  # only the root: the child was there before
        peak.stop()
    finally:
        for p in __import__("psutil").Process(root.pid).children(recursive=True):
            p.kill()
        root.kill()


def test_book_run_times_each_chapter_and_counts_a_kernel_started_during_a_slow_done(tmp_path):
    """A stand-in runner prints the book runner's lines around two chapters, each running a 300 MB child
    (its "kernel"); the second child starts at once, while the benchmark's `done` for the first is still
    busy: it still counts in the second chapter's peak, the first one's exiting child in neither's."""
    import time

    import bench_book

    hold = "import sys, time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.5)"
    runner = tmp_path / "runner.py"
    runner.write_text(  # as the book runner, it prepares a chapter (converts its notebook) before its kernel
        "import subprocess, sys, time\n"
        "for i, stem in enumerate(['00_demo_model', '01_output_tokens'], 1):\n"
        "    print(f'[book {i}/2] t: {stem} ...', flush=True)\n"
        "    time.sleep(1.0)\n"
        "    print('  x | [progress] preparing done', flush=True)\n"
        f"    subprocess.run([sys.executable, '-c', {hold!r}])\n"
        "    print(f'[book {i}/2] t: {stem} executed (2 s)', flush=True)\n")
    calls = []

    def slow_done(stem, entry):
        calls.append(stem)
        time.sleep(2.0)  # the next chapter's child starts meanwhile

    chapters, run = bench_book.run_book(["00_demo_model", "01_output_tokens"], Path("p.yaml"), dict(os.environ),
                                        tmp_path / "log", slow_done, cmd=[sys.executable, str(runner)],
                                        quiet_s=0.9)
    assert run["rc"] == 0 and calls[:2] == ["00_demo_model", "01_output_tokens"]
    for stem in ("00_demo_model", "01_output_tokens"):
        assert chapters[stem]["rc"] == 0 and chapters[stem]["wall_s"] >= 2.4
        assert chapters[stem]["peak_rss_gb"] > 0.25, (stem, chapters[stem])
        # the longest wait between two lines: the child's 1.5 s after the progress line, not the 1 s before it
        assert 1.4 < chapters[stem]["longest_silence_s"] < chapters[stem]["wall_s"] - 0.9
        assert chapters[stem]["silent_after"] == "x | [progress] preparing done"
        # every wait of at least quiet_s, longest first: the child's, then the preparation's
        waits = chapters[stem]["silences"]
        start = f"[book {int(stem[:2]) + 1}/2] t: {stem} ..."
        assert [after for _, after in waits] == ["x | [progress] preparing done", start]
        assert waits[0][0] == chapters[stem]["longest_silence_s"] and 0.9 <= waits[1][0] < waits[0][0]


def test_a_work_folder_keeps_its_stand_in_for_the_next_call_and_refuses_another_shape(tmp_path, monkeypatch):
    import bench_book

    builds = []

    def build(arch, n_layers, work):  # the real build writes gigabytes: the files it leaves stand in
        builds.append((arch, n_layers))
        (work / f"realwidth-{arch}").mkdir()
        (work / "saes").mkdir()
        params = work / f"realwidth-{arch}.yaml"
        params.write_text("target: t\n")
        return params, work / f"realwidth-{arch}", {"d_sae": 8}

    monkeypatch.setattr(bench_book, "build", build)
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)  # an interrupted build's leftovers: no record of a stand-in
    (work / "data" / "stale.parquet").write_text("")
    params, folder, widths, build_s = bench_book.standin("gpt2", 2, work, keep=True)
    assert builds == [("gpt2", 2)] and not (work / "data").exists() and build_s > 0
    (work / "data").mkdir()  # a chapter's tables, for the next call
    again = bench_book.standin("gpt2", 2, work, keep=True)
    assert builds == [("gpt2", 2)] and again == (params, folder, widths, 0.0) and (work / "data").exists()
    with pytest.raises(SystemExit, match="holds a gpt2 stand-in of 2 block"):
        bench_book.standin("gpt2", 3, work, keep=True)
    other = tmp_path / "other"
    (other / "book").mkdir(parents=True)  # a folder of the user's, say the repository: left alone
    (other / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not a stand-in's"):
        bench_book.standin("gpt2", 2, other, keep=True)
    assert (other / "book").is_dir() and len(builds) == 1
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    bench_book.standin("gpt2", 2, temporary, keep=False)  # a temporary folder records nothing
    assert not (temporary / bench_book.STANDIN).exists() and len(builds) == 2


def test_the_book_benchmark_counts_what_the_passes_keep():
    """bench_book's memory accounting of chapter 5 (`chapter5_pass_floats`) against the floats `measure`
    keeps in its pre-activations, residuals, z and patterns (the per-position scales and denominators, a few
    floats per token, are left out)."""
    import bench_book
    from test_context_neurons import C, N, measured, tiny_model, windows

    with torch.no_grad():
        model = tiny_model("llama")
        m = measured(model, C.Config(window=N, n_calibration=4, n_heldout=2), windows(4, 1),
                     {"a": windows(2, 2), "b": windows(2, 3)})
    kept = sum(getattr(lp, f).numel() for lp in [m.calibration, *m.heldout.values()]
               for f in ("pre", "rest", "z", "pattern"))
    c = model.cfg
    dims = dict(d_model=c.d_model, d_mlp=c.d_mlp, n_heads=c.n_heads, d_head=c.d_head)
    nb = dict(n_calibration=4, heldout={"a": "", "b": ""}, n_heldout=2, window=N)
    assert bench_book.chapter5_pass_floats(dims, nb) == kept
    assert bench_book.chapter5_pass_floats(dims) > kept  # the notebook's own defaults are read


def test_a_missing_tmp_folder_is_refused_before_any_build(tmp_path, monkeypatch, capsys):
    import bench_book

    monkeypatch.setattr(bench_book, "build", lambda *a: pytest.fail("built despite a missing --tmp"))
    with pytest.raises(SystemExit) as stop:
        bench_book.main(["--tmp", str(tmp_path / "missing"), "--layers", "1"])
    assert stop.value.code == 2 and "is not a folder: create it" in capsys.readouterr().err


def test_the_gpu_kit_packs_what_the_machine_lacks_and_nothing_it_has(tmp_path):
    import gpu_kit

    have = gpu_kit.read_have(None)
    found = gpu_kit.closure(["sae-lens"], have)
    assert "sae-lens" in found and "transformer-lens" in found  # sae-lens needs transformer-lens
    assert not {"torch", "transformers", "numpy", "pandas"} & set(found)  # the machine's own
    assert not gpu_kit.NOT_IMPORTED & set(found)
    listing = tmp_path / "pip-list.txt"  # `pip list` and `pip freeze` lines both read
    listing.write_text("Package    Version\n---------- -------\nTorch 2.11.0\nsae_lens==6.54.12\n")
    assert gpu_kit.read_have(listing) == {"torch", "sae-lens"}
    assert "sae-lens" not in gpu_kit.closure(["sae-lens"], gpu_kit.read_have(listing))


def test_gpu_checks_run_the_steps_given_and_count_an_unknown_one_as_failed(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "GPU_STEPS": "nope", "GPU_ARCHIVE": str(tmp_path / "a.tgz")}
    proc = subprocess.run(["bash", str(BENCH / "gpu_checks.sh"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "unknown step nope" in proc.stdout
    assert (tmp_path / "a.tgz").is_file()  # the archive is written however the run ends
    relative = subprocess.run(["bash", str(BENCH / "gpu_checks.sh"), "out"], cwd=tmp_path, capture_output=True,
                              env={**env, "GPU_ARCHIVE": "results/b.tgz"}, text=True, timeout=120)
    assert relative.returncode == 1 and (tmp_path / "out").is_dir()  # relative paths: the caller's folder
    assert (tmp_path / "results" / "b.tgz").is_file()


def test_silences_table_lists_every_long_wait_and_says_when_a_file_has_none():
    import bench_book

    result = {"chapters": {
        "01_output_tokens": {"wall_s": 100.0, "longest_silence_s": 25.8, "silent_after": "a | b",
                             "silences": [[25.8, "a | b"], [12.0, "c"]]},
        "02_attention": {"wall_s": 50.0, "longest_silence_s": 3.0, "silent_after": "d", "silences": []},
        "03_semantic_populations": {"wall_s": 9.0, "longest_silence_s": 9.0, "silent_after": "e"}}}
    rows = bench_book.silences(result).splitlines()[2:]
    assert rows[0] == "| 01_output_tokens | 100 | 25.8 | `a \\| b` | 25.8, 12.0 |"
    assert rows[1].endswith("| none |") and rows[2].endswith("| not recorded |")
