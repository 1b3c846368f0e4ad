"""Result tables: atomic writes, keyed reuse, and no torn file when a write is killed."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from weightscope import io
from weightscope.compute.token_scores import list_column


@pytest.fixture(autouse=True)
def _data(tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTSCOPE_DATA", str(tmp_path))


def test_roundtrip_and_key():
    df = pd.DataFrame({"feature": [0, 1], "x": [0.5, 2.0]})
    io.save_table(df, "t", "tab", key="k1", params={"a": 1})
    pd.testing.assert_frame_equal(io.load_table("t", "tab", key="k1"), df)
    assert io.load_table("t", "tab", key="other") is None
    assert io.table_meta("t", "tab")["params"] == {"a": 1}


def test_required_columns_alone_are_read_and_the_table_still_verifies():
    df = pd.DataFrame({"feature": [0, 1, 2], "ids": [[1, 2], [3, 4], [5, 6]], "x": [0.5, 2.0, 1.0]})
    io.save_table(df, "t", "wide", key="k1", params={})
    back = io.require_table("t", "wide", produced_by="01_output_tokens", columns=["feature", "x"])
    pd.testing.assert_frame_equal(back, df[["feature", "x"]])
    assert len(io.require_table("t", "wide", produced_by="01_output_tokens", columns=[])) == 3  # presence only
    path = io.table_path("t", "wide")
    path.write_bytes(path.read_bytes()[:-20])  # damaged: refused however few columns are asked for
    with pytest.raises(io.CacheError, match="damaged"):
        io.require_table("t", "wide", produced_by="01_output_tokens", columns=["feature"])


def test_list_columns_stay_arrow_backed_and_the_file_reads_in_plain_pandas():
    ids = np.arange(12, dtype=np.int64).reshape(4, 3)
    df = pd.DataFrame({"feature": range(4), "ids": list_column(ids),
                       "tokens": list_column([["a", "b"], [], ["c"], ["d", "e", "f"]]),
                       "kind": pd.Categorical(["x", "y", "x", "y"])})
    assert isinstance(df["ids"].dtype, pd.ArrowDtype) and df.loc[1, "ids"] == [3, 4, 5]
    io.save_table(df, "t", "lists", key="k1", params={})
    back = io.load_table("t", "lists", key="k1")
    pd.testing.assert_frame_equal(back, df)  # same dtypes too: computed and read-back layers concatenate
    assert back.loc[3, "tokens"] == ["d", "e", "f"] and back.loc[1, "tokens"] == []
    plain = pd.read_parquet(io.table_path("t", "lists"))  # a user's own pandas reads the file
    assert plain["ids"].map(list).tolist() == ids.tolist() and plain["kind"].dtype == "category"
    mixed = pd.concat([df, back], ignore_index=True)
    assert isinstance(mixed["tokens"].dtype, pd.ArrowDtype)  # not an object column of lists again
    assert len(list_column(np.empty((0, 3), dtype=np.int64))) == 0
    with pytest.raises(ValueError, match=r"rows \[n, k\]"):  # one row per entry would not line up
        list_column(np.arange(4))


def test_set_aside_empties_the_dict_while_the_block_runs_and_gives_equal_tables_back():
    frames = {"rows": pd.DataFrame({"layer": [0, 1, 1], "x": [0.5, np.nan, 2.0]}),
              "lists": pd.DataFrame({"feature": [0, 1], "top": list_column([["a", "b"], ["c"]])})}
    want = {name: frame.copy() for name, frame in frames.items()}
    with io.set_aside(frames, "t"):
        assert frames == {}
        assert list(io.results_dir("t").iterdir()) == []  # an unnamed file: nothing to leave behind
    assert list(frames) == list(want)
    for name, frame in want.items():
        pd.testing.assert_frame_equal(frames[name], frame)
        assert frames[name].dtypes.equals(frame.dtypes)  # the list column is Arrow-backed again
    with pytest.raises(KeyError), io.set_aside(frames, "t"):
        raise KeyError("a failing step")
    assert list(io.results_dir("t").iterdir()) == []


def test_token_column_equals_the_list_column_of_the_token_strings(tmp_path):
    """Arrow's gather gives the very column the Python lists gave, a missing token (None) included, and it
    survives a round trip through parquet as the same dtype."""
    import torch

    from weightscope.compute.token_scores import token_column

    vocab = ["a", " b", None, "\u2581c", "dd"]
    ids = torch.tensor([[0, 3, 2], [4, 4, 1]])
    want = list_column([[vocab[i] for i in row] for row in ids.tolist()])
    got = token_column(vocab, ids)
    assert got.dtype == want.dtype and [list(r) for r in got] == [list(r) for r in want]
    path = tmp_path / "t.parquet"
    pd.DataFrame({"tokens": got}).to_parquet(path)
    assert pd.read_parquet(path, dtype_backend="pyarrow")["tokens"].dtype == want.dtype


def test_missing_table_says_which_chapter_to_run():
    with pytest.raises(FileNotFoundError, match="Run the chapter 01_output_tokens first"):
        io.require_table("t", "nothing", produced_by="01_output_tokens")


def test_unwritable_folder_is_reported(tmp_path, monkeypatch):
    # A plain file where the output folder should be: cannot be created, even by root.
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    monkeypatch.setenv("WEIGHTSCOPE_DATA", str(blocker / "sub"))
    with pytest.raises(PermissionError, match="cannot create the output folder .*WEIGHTSCOPE_DATA"):
        io.save_table(pd.DataFrame({"a": [1]}), "t", "tab", key="k", params={})
    assert not list(tmp_path.rglob("*.parquet"))


def test_killed_write_leaves_old_file(tmp_path):
    """A child process is killed in the middle of writing a large table: the old table must survive intact."""
    old = pd.DataFrame({"x": [1.0, 2.0]})
    io.save_table(old, "t", "tab", key="old", params={})
    script = textwrap.dedent(
        f"""
        import os, signal, pandas as pd
        from weightscope import io
        real = os.replace
        def die(*a, **k):  # killed after the temporary file is complete but before the rename
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace = die
        io.save_table(pd.DataFrame({{"x": range(100000)}}), "t", "tab", key="new", params={{}})
        """
    )
    env = {**os.environ, "WEIGHTSCOPE_DATA": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script], env=env)
    assert proc.returncode == -9
    back = io.load_table("t", "tab", key="old")
    pd.testing.assert_frame_equal(back, old)


class _SAE:
    def __init__(self, layer):
        self.layer, self.sae_id, self.d_sae = layer, f"layer_{layer}", 4


def test_layer_tables_resume_at_first_missing_layer():
    calls = []

    def compute(sae):
        calls.append(sae.layer)
        return {"a": pd.DataFrame({"layer": [sae.layer] * 2, "x": [1.0, 2.0]}), "b": pd.DataFrame({"y": [sae.layer]})}

    saes = [_SAE(0), _SAE(1), _SAE(2)]
    first = io.layer_tables("t", "ch", saes, {"p": 1}, compute)
    assert calls == [0, 1, 2] and len(first["a"]) == 6 and first["b"]["y"].tolist() == [0, 1, 2]
    # a run killed during layer 1: its completion marker was never written
    io.table_path("t", "ch/layer_01_parts").unlink()
    again = io.layer_tables("t", "ch", saes, {"p": 1}, compute)
    assert calls == [0, 1, 2, 1]
    pd.testing.assert_frame_equal(again["a"], first["a"])
    io.layer_tables("t", "ch", saes, {"p": 2}, compute)  # new parameters: everything recomputed
    assert calls == [0, 1, 2, 1, 0, 1, 2]


def test_layer_tables_never_load_the_sae_of_a_cached_layer():
    from types import SimpleNamespace

    class Lazy:
        """Like load.sae_sequence.SAESequence: ids and layers known, each SAE loaded when indexed."""

        ids, layers, loaded = ["layer_0", "layer_1"], [0, 1], []

        def __len__(self):
            return 2

        def __getitem__(self, index):
            self.loaded.append(index)
            return SimpleNamespace(sae_id=self.ids[index], layer=self.layers[index], d_sae=4)

    compute = lambda sae: {"features": pd.DataFrame({"layer": [sae.layer], "x": [1.0]})}  # noqa: E731
    first = io.layer_tables("t", "lazy", Lazy(), {"p": 1}, compute)
    assert Lazy.loaded == [0, 1]
    again = io.layer_tables("t", "lazy", Lazy(), {"p": 1}, compute)
    assert Lazy.loaded == [0, 1]  # both layers cached: no SAE loaded the second time
    pd.testing.assert_frame_equal(first["features"], again["features"])


def test_cached_tables_recompute_a_set_left_half_written():
    calls = []

    def compute():
        calls.append(1)
        return {"a": pd.DataFrame({"x": [len(calls)]}), "b": pd.DataFrame({"y": [len(calls)]})}

    first = io.cached_tables("t", ["a", "b"], {"p": 1}, compute)
    again = io.cached_tables("t", ["a", "b"], {"p": 1}, compute)
    assert len(calls) == 1 and again["a"].equals(first["a"])
    io.table_path("t", "b").unlink()  # a run killed between the two writes
    third = io.cached_tables("t", ["a", "b"], {"p": 1}, compute)
    assert len(calls) == 2 and third["b"]["y"].tolist() == [2]
    io.cached_tables("t", ["a", "b"], {"p": 2}, compute)  # other provenance: recomputed
    assert len(calls) == 3


def test_an_sae_saved_again_into_its_folder_changes_the_keys(tmp_path):
    """Results and executed pages are keyed by the local input files, not only the folder's name: an SAE
    retrained into the same folder recomputes what read it; a hub source has no fingerprint."""
    import yaml

    from weightscope.chapters.context import input_files
    from weightscope.config.params import load_target

    saes = tmp_path / "saes" / "layer_0"
    saes.mkdir(parents=True)
    (saes / "sae_weights.safetensors").write_bytes(b"first")
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({"target": "t", "model": {"name": "gpt2-small"}, "saes": {"source": "./saes"}}))
    before = input_files(load_target(str(path)))
    assert before["model"] is None and before["saes"] is not None and before["attn_saes"] is None
    assert input_files(load_target(str(path))) == before  # stable
    (saes / "sae_weights.safetensors").write_bytes(b"second training")
    assert input_files(load_target(str(path)))["saes"] != before["saes"]
    assert io.folder_fingerprint(tmp_path / "missing") is None
