"""`model.name` resolution and download (offline: the hub client is monkeypatched), and bad model input.

Each bad input (folder without config.json or weights, unknown architecture, SAE that does not fit, truncated
shard, failed download) must end in one clear message, raised before any weights are read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest

import standins
from weightscope.chapters.context import open_chapter
from weightscope.load import sources
from weightscope.load.checkpoints import (
    CheckpointError,
    CheckpointNotFoundError,
    UnsupportedArchitectureError,
)
from weightscope.load.saes import SAEError

pytestmark = pytest.mark.skipif(not standins.GPT2_TOKENIZER.is_dir(),
                                reason="needs ../shared/tokenizers/gpt2")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    folder = standins.build_model("llama", root / "model", n_layers=2)
    return folder, standins.build_saes(folder, root / "saes")


def test_kinds_of_names(llama, tmp_path):
    folder, _ = llama
    assert sources.resolve_model("stories260K").kind == "demo"
    local = sources.resolve_model(str(folder))
    assert (local.kind, local.folder) == ("local", folder.resolve())
    rel = sources.resolve_model(folder.name, base=folder.parent)  # relative to the parameters file
    assert rel.kind == "local" and rel.folder == folder.resolve()
    tl = sources.resolve_model("gpt2-small")  # TransformerLens alias -> its official name, a hub repository
    assert (tl.kind, tl.repo_id, tl.tl_name) == ("hub", "gpt2", "gpt2")
    assert sources.resolve_model("gemma-2-2b").repo_id == "google/gemma-2-2b"
    hub = sources.resolve_model("someone/tiny-model")
    assert (hub.kind, hub.repo_id, hub.tl_name) == ("hub", "someone/tiny-model", None)
    with pytest.raises(sources.ModelSourceError, match="Unknown model 'no-such-model'.*model.name"):
        sources.resolve_model("no-such-model")
    with pytest.raises(sources.ModelSourceError, match="looks like a folder"):
        sources.resolve_model(str(tmp_path / "missing"))


def test_hub_download_fetches_config_first_then_only_the_needed_files(llama, monkeypatch, tmp_path):
    folder, _ = llama
    calls = []

    def hf_hub_download(repo_id, filename, **kwargs):
        calls.append(("file", repo_id, filename))
        return str(folder / filename)

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append(("snapshot", repo_id, tuple(allow_patterns)))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    got = sources.model_folder(sources.resolve_model("someone/tiny-llama"), progress=False)
    assert got == folder
    assert calls[0] == ("file", "someone/tiny-llama", "config.json")
    assert calls[1][:2] == ("snapshot", "someone/tiny-llama")
    patterns = calls[1][2]
    assert "config.json" in patterns and "model*.safetensors" in patterns and "tokenizer*" in patterns
    assert not any(p.endswith((".bin", ".pt", ".h5", ".msgpack")) or p == "*" for p in patterns)


def test_unsupported_hub_model_is_refused_before_its_weights(monkeypatch, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5Model"]}))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: str(tmp_path / "config.json"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda *a, **k: pytest.fail("weights downloaded for an unsupported model"))
    supported = "gemma2, llama, mistral, qwen2, gpt2"
    with pytest.raises(UnsupportedArchitectureError, match=f"model_type='t5'.*{supported}"):
        sources.model_folder(sources.resolve_model("someone/t5"), progress=False)


def test_download_failure_names_the_model_and_what_to_do(monkeypatch):
    def gated(*args, **kwargs):
        raise huggingface_hub.errors.GatedRepoError("403 Client Error: access to model is restricted")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(sources.ModelSourceError) as err:
        sources.model_folder(sources.resolve_model("gemma-2-2b"), progress=False)
    message = str(err.value)
    assert "'gemma-2-2b'" in message and "google/gemma-2-2b" in message
    assert "HF_TOKEN" in message and "licence" in message


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def test_folder_without_config_or_weights(llama, tmp_path):
    folder = _copy(llama[0], tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match="no config.json.*Hugging Face format"):
        sources.resolve_model(str(folder))
    shutil.copy(llama[0] / "config.json", folder / "config.json")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match="no .safetensors weights"):
        sources.resolve_model(str(folder))


def test_params_naming_a_bad_folder_fail_at_open_chapter(llama, tmp_path):
    folder = _copy(llama[0], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "falcon", "architectures": []}))
    params = standins.write_params("bad", folder, llama[1], tmp_path / "bad.yaml")
    with pytest.raises(UnsupportedArchitectureError, match="falcon"):
        open_chapter(str(params))


def test_truncated_shard(llama, tmp_path):
    folder = _copy(llama[0], tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    params = standins.write_params("cut", folder, llama[1], tmp_path / "cut.yaml")
    with pytest.raises(CheckpointError, match="truncated"):
        open_chapter(str(params)).load_model_and_saes()


def test_sae_that_does_not_fit_is_refused_before_any_sae_weights(llama, tmp_path, monkeypatch):
    from weightscope.load import sae_sequence

    other = standins.build_model("gpt2", tmp_path / "gpt2", n_layers=2)
    wide = standins.build_saes(other, tmp_path / "saes", flags={})
    cfg = json.loads((wide / "layer_1" / "cfg.json").read_text())
    (wide / "layer_1" / "cfg.json").write_text(json.dumps({**cfg, "d_in": 96}))
    params = standins.write_params("misfit", llama[0], wide, tmp_path / "misfit.yaml")
    monkeypatch.setattr(sae_sequence, "load_saes", lambda *a, **k: pytest.fail("SAE weights read"))
    with pytest.raises(SAEError, match="d_in=96.*width d_model=64"):
        open_chapter(str(params)).load_model_and_saes()


def test_unhonourable_processing_flag_is_refused(llama, tmp_path):
    from weightscope.load.weights_model import ProcessingError

    saes = standins.build_saes(llama[0], tmp_path / "saes", flags={"refactor_factored_attn_matrices": True})
    params = standins.write_params("refactor", llama[0], saes, tmp_path / "refactor.yaml")
    with pytest.raises(ProcessingError, match="refactor_factored_attn_matrices.*model.processing"):
        open_chapter(str(params)).load_model_and_saes()


def test_check_target_refuses_a_misfit_without_reading_weights(llama, tmp_path, monkeypatch):
    from weightscope.chapters.context import check_target
    from weightscope.config.params import load_target
    from weightscope.load import checkpoints, hooked, weights_model
    from weightscope.load.sources import resolve_model

    def check(path):  # the parsed file and its resolved model, as the pre-flight hands them over
        params = load_target(path)
        check_target(params, resolve_model(params.model_name, base=params.path.parent))

    for module in (checkpoints, weights_model, hooked):
        monkeypatch.setattr(module, "load_weights", lambda *a, **k: pytest.fail("weights read"))
    check(standins.write_params("ok", llama[0], llama[1], tmp_path / "ok.yaml"))
    three = standins.build_saes(llama[0], tmp_path / "three", layers=[0, 1])
    cfg = three / "layer_1" / "cfg.json"
    cfg.write_text(cfg.read_text().replace("blocks.1.hook_resid_post", "blocks.1.hook_nope"))
    with pytest.raises(SAEError, match="hook_nope"):
        check(standins.write_params("bad", llama[0], three, tmp_path / "bad.yaml", layers=[0, 1]))