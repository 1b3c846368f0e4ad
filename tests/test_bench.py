"""The benchmark harness: it finds the benchmark files, each declares what the runner needs, results files
render as tables, and a standalone script is listed but neither imported nor run. (No timings here: those
belong in bench/ runs.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
