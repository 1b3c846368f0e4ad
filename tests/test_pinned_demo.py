"""The pinned demo SAEs (`data/demo_saes/`): checksummed, loaded without training, one demo on every machine.

The SAEs are the training's exact bytes, so every machine reads the same features; the demo's main result
tables (chapter 1's per-feature table, chapter 2's reads) are compared with checksums stored beside them
(`tests/demo_checksums.py`), so a change that moves them fails here whichever machine runs it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from weightscope.load import saes
from weightscope.load.saes import SAEError
from weightscope.prepare import demo_saes

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import demo_checksums  # noqa: E402

PINNED = {"default": demo_saes.DEFAULT, "attn": demo_saes.ATTN}


@pytest.fixture
def clean_data(tmp_path, monkeypatch):
    """An empty data folder (no cache, no pointer): what a fresh clone has."""
    monkeypatch.setenv("WEIGHTSCOPE_DATA", str(tmp_path / "data"))
    return tmp_path / "data"


@pytest.fixture
def pinned_copy(tmp_path, monkeypatch):
    """A copy of data/demo_saes/ that the test may damage, read in place of the shipped one."""
    copy = tmp_path / "demo_saes"
    shutil.copytree(saes.PINNED_DIR, copy)
    monkeypatch.setattr(saes, "PINNED_DIR", copy)
    monkeypatch.setenv("WEIGHTSCOPE_DATA", str(tmp_path / "data"))
    return copy


@pytest.mark.parametrize("config", sorted(PINNED))
def test_pinned_folders_are_complete_and_match_their_checksums(config):
    folder = saes.pinned_demo_folder(config)
    assert folder == saes.PINNED_DIR / config
    assert saes.pinned_problems(folder) == []
    listed = saes.read_checksums(folder)
    for layer in range(5):  # every block of stories260K, in sae-lens's folder format
        files = ("cfg.json", "sae_weights.safetensors", "metrics.json")
        assert {f"layer_{layer}/{f}" for f in files} <= set(listed)
    assert "manifest.json" in listed


@pytest.mark.parametrize("config", sorted(PINNED))
def test_pinned_manifest_says_how_they_were_trained(config):
    folder = saes.PINNED_DIR / config
    manifest = saes.read_manifest(folder)
    assert manifest["config"] == json.loads(json.dumps(PINNED[config].key_dict()))  # parameters and seed
    assert manifest["cache_key"].startswith(f"{config}-") and manifest["complete"]
    assert {"sae-lens", "torch", "transformer-lens"} <= set(manifest["versions"])
    assert manifest["n_eval_stories"] > 0 and manifest["config"]["holdout_fraction"] == 0.05
    assert [c["file"].split("/")[0] for c in manifest["corpus"]] == ["$WEIGHTSCOPE_CORPORA"] * 2
    sums = saes.read_checksums(folder)
    for layer, metrics in manifest["per_layer"].items():  # the quality figures belong to these very files
        assert metrics["sha256"]["sae_weights.safetensors"] == sums[f"layer_{layer}/sae_weights.safetensors"]
        assert metrics["meets_bar"] == saes.meets_bar(metrics)
    text = "".join(p.read_text() for p in folder.rglob("*.json"))
    assert "/work/" not in text and "/home/" not in text and "/tmp/" not in text  # no machine's paths


def test_demo_loads_the_pinned_saes_on_a_clean_data_folder(clean_data):
    assert saes.demo_sae_folder() == saes.PINNED_DIR / "default"
    loaded = saes.load_saes("demo", [0, 4])
    assert [(s.hook_name, s.d_in, s.d_sae, s.k) for s in loaded] == [
        ("blocks.0.hook_resid_post", 64, 512, 16), ("blocks.4.hook_resid_post", 64, 512, 16)]
    attn = saes.load_saes("demo:attn", [2])
    assert attn[0].hook_name == "blocks.2.attn.hook_z" and attn[0].source == "demo:attn"


def test_prepare_stage_uses_the_pinned_saes_and_never_trains(clean_data, monkeypatch, capsys):
    def must_not_train(*args, **kwargs):
        raise AssertionError("the prepare stage trained although the pinned SAEs fit")

    monkeypatch.setattr(demo_saes, "_ensure", must_not_train)
    for config in PINNED:
        assert demo_saes.ensure_demo_saes(config) == saes.PINNED_DIR / config
    assert "pinned" in capsys.readouterr().out
    assert not (clean_data / "cache" / "demo_saes").exists()  # nothing written: no lock, no pointer


def test_changed_training_parameters_take_the_retrain_path(clean_data, monkeypatch):
    changed = dataclasses.replace(demo_saes.DEFAULT, seed=1)
    assert demo_saes.matching_pinned(changed) is None
    monkeypatch.setattr(demo_saes, "_ensure", lambda cfg, *a: ("trained", cfg.seed))
    assert demo_saes.ensure_demo_saes(changed) == ("trained", 1)


def _fake_training(data: Path, name: str) -> Path:
    folder = data / "cache" / "demo_saes" / name
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")
    return folder


def test_pointer_is_read_only_for_a_training_with_other_parameters(clean_data):
    pointer = saes.demo_sae_pointer("default")
    other = _fake_training(clean_data, "default-0123456789ab")
    pointer.write_text(json.dumps({"config": "default", "folder": str(other)}))
    assert saes.demo_sae_folder() == other  # the user's retrain with other parameters
    assert demo_saes.matching_pinned(demo_saes.DEFAULT) == saes.PINNED_DIR / "default"
    assert not pointer.exists()  # back to the pinned parameters: the stale pointer is dropped
    assert saes.demo_sae_folder() == saes.PINNED_DIR / "default"
    # a training with the pinned parameters (e.g. `make demo-saes` on this machine) never replaces them
    same = _fake_training(clean_data, saes.pinned_cache_key(saes.PINNED_DIR / "default"))
    pointer.write_text(json.dumps({"config": "default", "folder": str(same)}))
    assert saes.demo_sae_folder() == saes.PINNED_DIR / "default"


def test_damaged_or_missing_pinned_file_is_a_clear_error(pinned_copy):
    weights = pinned_copy / "default" / "layer_3" / "sae_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(SAEError, match=r"layer_3/sae_weights.safetensors is damaged .*git checkout -- data/de"):
        saes.load_saes("demo")
    with pytest.raises(SAEError, match="damaged"):
        demo_saes.ensure_demo_saes("default", progress=False)  # the prepare stage refuses too (exit 2)
    (pinned_copy / "attn" / "layer_0" / "cfg.json").unlink()
    with pytest.raises(SAEError, match=r"layer_0/cfg.json is missing"):
        saes.load_saes("demo:attn")
    assert saes.load_saes(pinned_copy / "attn", ["layer_1"])  # a folder passed by path is not checked


def test_no_demo_saes_at_all_says_how_to_get_them(pinned_copy):
    shutil.rmtree(pinned_copy / "attn")
    with pytest.raises(SAEError, match=r"git checkout -- data/demo_saes.*--config attn"):
        saes.demo_sae_folder("attn")


# ------------------------------------------------------------------------------------------------------------
# The demo's result checksums


def test_fingerprints_ignore_row_order_and_last_bit_noise_and_name_the_column_that_moved():
    rng = np.random.default_rng(0)
    n = 2560  # chapter 1's features on the demo
    frame = pd.DataFrame({"layer": np.repeat(np.arange(5), 512), "feature": np.tile(np.arange(512), 5),
                          "z": rng.normal(size=n).astype(np.float32),
                          "mean": rng.normal(size=n) * np.where(np.arange(n) % 10 == 0, 1e-6, 1),
                          "top": [rng.normal(size=10).astype(np.float32).tolist() for _ in range(n)],
                          "tokens": [["a", "b"]] * n, "passes": rng.random(n) < 0.3})
    base = demo_checksums.checksums({"01_features": frame})
    noisy = frame.iloc[::-1].reset_index(drop=True)  # row order does not count
    ulps = rng.integers(-4, 5, size=n)  # a few units in the last place, as another processor may give
    noisy["z"] = [float(np.float32(v) + k * np.spacing(np.float32(v))) for v, k in zip(noisy["z"], ulps)]
    # a sum's rounding is absolute, on the scale of what was summed: values near 0 move by 10% of themselves
    noisy["mean"] = noisy["mean"] + 1e-7 * rng.normal(size=n)
    noisy["top"] = [[v * (1 + 3e-7) for v in row] for row in noisy["top"]]
    assert demo_checksums.differences(base, demo_checksums.checksums({"01_features": noisy})) == []
    rms = float(np.sqrt((frame["z"] ** 2).mean()))
    moved = frame.copy()
    moved.loc[7, "z"] += 0.01 * rms  # one value of 2,560 by 1% of the column's scale
    moved.loc[3, "passes"] = not moved.loc[3, "passes"]  # one verdict
    moved.at[5, "tokens"] = ["b", "a"]  # one token list reordered
    lines = demo_checksums.differences(base, demo_checksums.checksums({"01_features": moved}))
    assert [line.split(":")[0] for line in lines] == ["01_features.passes", "01_features.tokens",
                                                       "01_features.z"]
    assert "of its norm (tolerance 1e-04)" in lines[2]
    assert demo_checksums.differences(base, {}) == ["01_features: table no longer computed"]


def test_fingerprint_compares_lengths_and_where_values_are_not_finite():
    base = demo_checksums.fingerprint(pd.Series([1.0, float("nan"), 3.0]))
    assert demo_checksums.column_moved(base, demo_checksums.fingerprint(pd.Series([1.0, np.nan, 3.0]))) is None
    moved = demo_checksums.fingerprint(pd.Series([1.0, 2.0, float("nan")]))
    assert demo_checksums.column_moved(base, moved) == "other values not finite"
    longer = demo_checksums.fingerprint(pd.Series([[1.0, 2.0], [3.0, 4.0]]))
    assert demo_checksums.column_moved(longer, demo_checksums.fingerprint(pd.Series([[1.0], [3.0]]))) == (
        "2 values, 4 stored")
    assert "sha" in demo_checksums.fingerprint(pd.Series([[1, 2], [3]]))  # int lists (token ids): exact


def test_stored_checksums_cover_the_main_tables():
    stored = demo_checksums.stored_checksums()
    assert stored["tolerance"] == demo_checksums.TOLERANCE
    features = stored["tables"]["01_features"]
    assert features["rows"] == 5 * 512
    assert {"dec_predicts", "enc_predicts", "dec_top_tokens", "enc_top_tokens"} <= set(features["columns"])
    profiles = stored["tables"]["02_features"]["columns"]
    assert {"q_z_mean", "k_z_mean", "q_part_frac", "k_part_frac"} <= set(profiles)
    assert {"q_frac", "k_frac", "v_frac"} <= set(stored["tables"]["02_heads"]["columns"])


@pytest.mark.slow
def test_demo_result_tables_match_the_checksums_stored_beside_the_pinned_saes():
    missing = demo_checksums.missing_demo_inputs()
    if missing:
        pytest.skip(f"input missing: {'; '.join(missing)}")
    stored = demo_checksums.stored_checksums()
    assert stored["sae_checksums"] == demo_checksums.sae_checksums(), (
        "the demo SAEs in use are not those the stored result checksums were made from: if the pinned SAEs "
        "changed on purpose, run `make demo-checksums` and commit data/demo_saes/results.json")
    current = demo_checksums.checksums(demo_checksums.demo_tables())
    lines = demo_checksums.differences(stored["tables"], current)
    assert not lines, ("the demo's main results moved:\n" + "\n".join(lines) + "\nIf the change is meant, "
                       "run `make demo-checksums` and commit data/demo_saes/results.json.")
