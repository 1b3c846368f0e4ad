"""The weights-only atlas: bad input refused in one message, a Ray run over the demo SAEs and tiny random
"releases" (two architectures, two widths) that resumes after its driver is killed, rows equal to chapter 1.

One local Ray session serves the whole module (start-up is slow on small machines); the killed driver
joins it.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from weightscope.publish import atlas

SMALL = ["--max-features", "32", "--n-null", "128"]
C1 = atlas.ch1.Config(max_features=32, n_null=128)
C2 = atlas.ch2.Config(max_features=32, n_null=128)


def _tiny_release(folder: Path, arch: str, width: int, layers=(1, 3)) -> Path:
    """Random SAEs on the demo model (d_model 64) saved in sae-lens's folder format."""
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    gen = torch.Generator().manual_seed(width + len(arch))
    for layer in layers:
        meta = SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post", model_name="stories260K",
                           model_from_pretrained_kwargs={})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sae = (TopKSAE(TopKSAEConfig(d_in=64, d_sae=width, k=8, metadata=meta)) if arch == "topk" else
                   StandardSAE(StandardSAEConfig(d_in=64, d_sae=width, metadata=meta)))
        with torch.no_grad():
            sae.W_dec.copy_(torch.randn(width, 64, generator=gen))
            sae.W_enc.copy_(torch.randn(64, width, generator=gen))
        sae.save_model(folder / f"layer_{layer}")
    return folder


@pytest.fixture(scope="module")
def saes_list(tmp_path_factory):
    root = tmp_path_factory.mktemp("atlas")
    lines = ["saes:", "  - folder: demo", "    ids: 'layer_[02]'"]
    for arch, width in (("topk", 96), ("standard", 160)):
        folder = _tiny_release(root / f"{arch}-{width}", arch, width)
        lines += [f"  - folder: {folder}", "    model: stories260K"]
    path = root / "list.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def ray_session():
    ray = atlas.connect(None, 2)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _bad(tmp_path, text, *extra):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return atlas.main([str(path), *extra])


@pytest.mark.parametrize("text, words", [
    ("saes:\n  - release: no-such-release-xyz\n", "unknown sae-lens release"),
    ("saes:\n  - release: gpt2-small-res-jb\n    ids: 'nothing-matches-this'\n", "matches none"),
    ("saes:\n  - folder: {tmp}\n    model: stories260K\n", "holds no sae-lens SAE"),
])
def test_bad_input_is_one_message_and_exit_2(tmp_path, capsys, text, words):
    assert _bad(tmp_path, text.format(tmp=tmp_path)) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


def test_all_problems_in_one_message(tmp_path, capsys):
    text = "saes:\n  - release: no-such-release-xyz\n  - folder: /no/such/folder\n    model: stories260K\n"
    assert _bad(tmp_path, text) == 2
    err = capsys.readouterr().err
    assert "unknown sae-lens release" in err and "does not exist" in err


def test_unreachable_cluster_is_exit_2(saes_list, capsys):
    assert atlas.main([str(saes_list), "--address", "127.0.0.1:9", *SMALL]) == 2
    assert "cannot reach the Ray cluster" in capsys.readouterr().err


def test_dry_run_counts_saes_and_models(saes_list, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTSCOPE_ATLAS_DIR", str(tmp_path))
    assert atlas.main([str(saes_list), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "6 SAEs over 1 models" in out and "stories260K" in out
    assert not list(tmp_path.iterdir())  # nothing started, nothing written


def test_dry_run_bytes_come_from_the_hub_listing_where_it_answers(monkeypatch):
    """A release's SAE is sized by its files in the hub's listing (one listing per repository); where the hub
    does not answer, by its width; a local SAE downloads nothing."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    mb = 2**20
    files = [SimpleNamespace(rfilename=f"layer_0/width_16k/average_l0_105/{n}", size=s)
             for n, s in (("params.npz", 300 * mb), ("cfg.json", 1))]
    files.append(SimpleNamespace(rfilename="layer_1/width_16k/average_l0_102/params.npz", size=7))
    calls = []

    class Hub:
        def model_info(self, repo_id, **kw):
            calls.append(repo_id)
            if repo_id != "google/gemma-scope-2b-pt-res":
                raise OSError("unreachable")
            return SimpleNamespace(siblings=files)

    jobs = atlas.expand([{"release": "gemma-scope-2b-pt-res-canonical", "ids": "^layer_0/width_16k/canonical$"},
                         {"release": "gpt2-small-res-jb", "ids": r"^blocks\.0\."}, {"folder": "demo"}])
    sizes = atlas.hub_sizes(jobs, api=Hub())
    assert sizes == {("gemma-scope-2b-pt-res-canonical", "layer_0/width_16k/canonical"): 300 * mb + 1}
    assert sorted(calls) == ["google/gemma-scope-2b-pt-res", "jbloom/GPT2-Small-SAEs-Reformatted"]
    table = atlas.plan(jobs, sizes).set_index("model")
    assert table.loc["gemma-2-2b", "bytes"] == 300 * mb + 1 and table.loc["gemma-2-2b", "sized_from_hub"] == 1
    # the hub did not answer and the id names no width: two float32 matrices at the assumed width
    assert table.loc["gpt2-small", "bytes"] == 2 * 4 * atlas.ASSUMED_WIDTH * 768
    assert table.loc["stories260K", "bytes"] == 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert atlas.hub_sizes(jobs, api=Hub()) == {}


def test_wilson_interval_brackets_the_rate():
    lo, hi = atlas.wilson(0.1, 100)
    assert lo < 0.1 < hi and 0.05 < lo and hi < 0.18


@pytest.mark.slow  # about 100 s on two shared cores (Ray start-up, a killed driver, two resumed runs)
def test_killed_run_resumes_and_rows_equal_chapter_1(saes_list, ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTSCOPE_ATLAS_DIR", str(tmp_path))
    monkeypatch.delenv("WEIGHTSCOPE_PROGRESS", raising=False)  # the per-SAE lines counted below are progress lines
    records = tmp_path / "saes"
    driver = subprocess.Popen([sys.executable, "-m", "weightscope.publish.atlas", str(saes_list),
                               "--address", ray_session, *SMALL], env=os.environ.copy())
    deadline = time.time() + 300
    while time.time() < deadline and not (records.is_dir() and list(records.glob("*.json"))):
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = {p.name for p in records.glob("*.json")}
    assert 1 <= len(before), "the driver wrote no result before it was killed"

    jobs = atlas.expand(atlas.read_list(saes_list))
    logs = []
    summary = atlas.run_atlas(jobs, c1=C1, c2=C2, workers=2, log=logs.append)
    assert len(summary) == 6 and set(summary["status"]) == {"done"}, summary[["sae_id", "reason"]]
    measured = [line for line in logs if line.lstrip().startswith("[")]
    assert len(measured) == 6 - len(before)  # the resumed run measured only what had no verified result
    assert {p.name for p in records.glob("*.json")} >= before
    assert set(summary["width"]) == {512, 96, 160} and set(summary["architecture"]) == {"topk", "standard"}

    logs.clear()
    again = atlas.run_atlas(jobs, c1=C1, c2=C2, workers=2, log=logs.append)
    assert logs == ["atlas: 6 SAEs, 6 with a verified result, 0 to measure"]
    pd.testing.assert_frame_equal(again.drop(columns="versions"), summary.drop(columns="versions"))

    # each row equals chapter 1 run on that SAE alone
    from weightscope.load.saes import load_saes
    from weightscope.load.weights_model import load_weights_model

    model = load_weights_model("stories260K", progress=False)
    ctx = SimpleNamespace(params=SimpleNamespace(target="atlas-test", neuronpedia=None),
                          provenance=lambda **kw: {"chapter": kw}, dtype=torch.float32)
    try:
        for job in jobs[:1] + jobs[-1:]:
            sae = load_saes(job.source, [job.sae_id])[0]
            rates = atlas.ch1.run(ctx, C1, model=model, saes=[sae]).rates
            row = summary[(summary["release"] == job.source) & (summary["sae_id"] == job.sae_id)].iloc[0]
            for side in rates["side"].unique():
                r = rates[rates["side"] == side].set_index("population")["fraction"]
                name = side.split()[0]
                assert row[f"{name}_rate"] == pytest.approx(r["SAE features"], abs=1e-12)
                assert row[f"{name}_null_random"] == pytest.approx(r["null: random"], abs=1e-12)
    finally:
        shutil.rmtree(atlas.results_dir("atlas-test"), ignore_errors=True)

    # an altered result file is not verified: that SAE alone is measured again
    table = next((records).glob("*.parquet"))
    table.write_bytes(table.read_bytes() + b"x")
    logs.clear()
    atlas.run_atlas(jobs, c1=C1, c2=C2, workers=2, log=logs.append)
    assert logs[0] == "atlas: 6 SAEs, 5 with a verified result, 1 to measure"


def test_cross_model_tables_from_a_planted_summary(monkeypatch, tmp_path):
    """A planted summary: one SAE far above its null and the paper, one at its null."""
    from weightscope.publish import cross_model

    monkeypatch.setenv("WEIGHTSCOPE_ATLAS_DIR", str(tmp_path))
    row = {"model": "m", "release": "r", "layer": 0, "width": 100, "status": "done", "attn_chance": 0.01}
    for side in ("decoder-unembedding", "encoder-embedding"):
        row |= {f"{side}_{k}": v for k, v in zip(("rate", "lo", "hi", "null_random"), (0.5, 0.4, 0.6, 0.01))}
    for s in ("query", "key", "value"):
        row |= {f"attn_{s}_iso": 0.2, f"attn_{s}_cov": 0.1}
    low = row | {"layer": 4, "sae_id": "b", "decoder-unembedding_rate": 0.01, "decoder-unembedding_lo": 0.0,
                 "decoder-unembedding_hi": 0.05}
    summary = pd.DataFrame([row | {"sae_id": "a"}, low])
    summary.to_csv(tmp_path / "summary.csv", index=False)
    depth = cross_model.rate_by_depth(cross_model.atlas_summary())
    out = depth[depth["side"].str.startswith("output")].set_index("sae_id")
    assert list(out["depth"]) == [0.0, 1.0] and out.loc["a", "paper"] == 0.25
    text = " ".join(cross_model.findings(summary, cross_model.built_targets()))
    assert "m, output (decoder-unembedding) side" in text and "1 of 2 have their 95% interval above" in text
    assert "0 of them lie entirely below" not in text and "which 1 of them lie entirely below and 1" in text
    attn = cross_model.attention_by_depth(summary)
    assert len(attn) == 2 * 3 * 2 and set(attn["null"]) == {"isotropic", "decoder covariance"}
