"""`tests/processor_check.py`'s comparison: rounding passes, a moved choice or value is named."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import processor_check  # noqa: E402


def _table(rng) -> pd.DataFrame:
    n = 200
    return pd.DataFrame({"layer": np.repeat([0, 1], n // 2), "feature": np.tile(np.arange(n // 2), 2),
                         "dest": rng.integers(0, 128, n), "family": rng.choice(["short", "long"], n),
                         "mean_distance": rng.gamma(2.0, 3.0, n),
                         "scores": [rng.normal(size=4) for _ in range(n)]})


def test_rounding_and_row_order_pass_and_a_moved_choice_or_value_is_named():
    rng = np.random.default_rng(0)
    a = _table(rng)
    b = a.sample(frac=1, random_state=1).reset_index(drop=True)  # another row order
    b["mean_distance"] = b["mean_distance"] * (1 + 1e-7 * rng.normal(size=len(b)))  # last bits
    b["scores"] = [s * (1 + 1e-7) for s in b["scores"]]
    assert processor_check.table_differences("t", a, b) == ([], [])
    moved = a.copy()
    moved.loc[5, "dest"] = moved.loc[5, "dest"] + 1  # a near-tie chose another position
    moved.loc[9, "mean_distance"] += 0.13  # and so another mean
    lines, notes = processor_check.table_differences("t", a, moved)
    assert len(lines) == 2 and lines[0].startswith("t.dest: 1 rows differ")
    assert lines[1].startswith("t.mean_distance: moved by up to")
    assert processor_check.table_differences("t", a, a.drop(columns="dest"))[0][0].startswith("t: shape")


def test_the_dfa_splits_rounding_errors_are_not_compared():
    a = pd.DataFrame({"feature": [1, 2], "abs_error": [1e-7, 2e-7], "error_vs_sae_lens": [0.0, 3e-7]})
    b = a.assign(abs_error=[3e-7, 1e-8], error_vs_sae_lens=[1e-7, 0.0])
    assert processor_check.table_differences("demo/04_dfa_examples", a, b) == ([], [])
    assert len(processor_check.table_differences("other_table", a, b)[0]) == 2


def test_folder_differences_reads_every_stored_table_and_names_a_missing_one(tmp_path):
    rng = np.random.default_rng(2)
    for side in ("own", "other"):
        (tmp_path / side / "demo" / "01_token_lens").mkdir(parents=True)
        _table(rng).to_parquet(tmp_path / side / "demo" / "01_token_lens" / "layer_0.parquet")
    _table(np.random.default_rng(3)).to_parquet(tmp_path / "own" / "demo" / "02_features.parquet")
    lines, _ = processor_check.folder_differences(tmp_path / "own", tmp_path / "other")
    assert lines[0].startswith("demo/01_token_lens/layer_0.dest: ")  # two different random tables
    assert lines[-1] == "demo/02_features: not computed with the other kernels"


def test_token_lists_that_differ_only_by_a_near_tie_are_a_note_and_others_a_difference():
    # chapter 6's token lens, SSE4.2 kernels against AVX-512 on the demo: tokens 418 and 412 scored
    # 0.301559031 and 0.301558942 with one set, 0.301558971 and 0.301558942 with the other, and swapped places
    ids = [363, 444, 418, 412, 378]
    a = pd.DataFrame({"row": [0, 1], "enc_top_ids": [ids, ids],
                      "enc_top_scores": [[0.83, 0.53, 0.301559031, 0.301558942, 0.298]] * 2})
    b = a.copy()
    b.at[0, "enc_top_ids"] = [363, 444, 412, 418, 378]
    b.at[0, "enc_top_scores"] = [0.83, 0.53, 0.301558971, 0.301558942, 0.298]
    lines, notes = processor_check.table_differences("t", a, b)
    assert lines == [] and notes == [
        "t.enc_top_ids: 1 rows differ only where two tokens score the same within 1e-05 of the row's largest "
        "score (near-ties)"]
    b.at[1, "enc_top_ids"] = [363, 444, 418, 412, 99]  # another token in last place, scoring 0.298 vs 0.2
    b.at[1, "enc_top_scores"] = [0.83, 0.53, 0.301559031, 0.301558942, 0.2]
    lines, notes = processor_check.table_differences("t", a, b)
    assert [line.split(":")[0] for line in lines] == ["t.enc_top_ids", "t.enc_top_scores"] and len(notes) == 1
