"""Where a model's weights come from: `model.name` of a parameters file resolved to a folder on disk.

`model.name` is one of

* "stories260K", the offline demo model (llama2.c files, see `weightscope.load.models`);
* a local folder in Hugging Face format: config.json, model.safetensors (or a sharded index), tokenizer files;
* a TransformerLens model name or alias ("gpt2-small", "gemma-2-2b"), mapped to its Hugging Face repository
  through TransformerLens's own table (`get_official_model_name`: the official names are repository ids);
* any other Hugging Face hub id ("owner/name"), downloaded with `huggingface_hub.snapshot_download`, only the
  config, safetensors and tokenizer files (`ALLOW_PATTERNS`), into the hub's cache.

`resolve_model(name)` decides which without touching the network; `model_folder(source)` returns the folder,
downloading first when needed. The architecture is checked from config.json alone (downloaded first, a few
kilobytes) before any weights, so an unsupported model stops before any work.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from weightscope.load.checkpoints import (
    SUPPORTED_ARCHS,
    CheckpointError,
    CheckpointNotFoundError,
    detect_arch,
)
from weightscope.load.llama2c import DEMO_MODEL

ALLOW_PATTERNS = ["config.json", "generation_config.json", "model*.safetensors",
                  "model.safetensors.index.json", "tokenizer*", "special_tokens_map.json", "vocab.json", "merges.txt", "*.model",
                  "*.tiktoken"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_GATED_HINT = (
    "Gated models (Gemma-2, Llama-3.x) need the licence accepted on the model's Hugging Face page and a "
    "token: set HF_TOKEN (or run `hf auth login`). Offline, set `model.name` to a local folder holding the "
    "model."
)


class ModelSourceError(CheckpointError):
    """`model.name` names no model weightscope can find, or its download failed; the message says what to do.
    """


@dataclass(frozen=True)
class ModelSource:
    """A resolved `model.name`.

    kind: "demo" | "local" | "hub"; name: as written in the parameters; repo_id: the hub repository ("hub");
    folder: the local folder ("local"; for "hub" once downloaded); tl_name: TransformerLens's official name
    when TransformerLens knows the model (then chapter 0 can build it with `HookedTransformer`).
    """

    kind: str
    name: str
    repo_id: str | None = None
    folder: Path | None = None
    tl_name: str | None = None

    def as_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "repo_id": self.repo_id,
                "folder": str(self.folder) if self.folder else None, "tl_name": self.tl_name}


def transformer_lens_official_name(name: str) -> str | None:
    """TransformerLens's official name (a hub repository id) of a name or alias; None if it is unknown."""
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        return get_official_model_name(name)
    except ValueError:
        return None


def resolve_model(name: str, *, base: Path | None = None) -> ModelSource:
    """Which model `name` means (no network). A relative folder is looked up from `base`, then the cwd.

    Raises ModelSourceError when `name` is none of the four kinds.
    """
    if name.lower() == DEMO_MODEL.lower():
        return ModelSource("demo", name, tl_name=None)
    path = Path(name).expanduser()
    for candidate in ([base / path] if base is not None and not path.is_absolute() else []) + [path]:
        if candidate.is_dir():
            check_folder(candidate)
            return ModelSource("local", name, folder=candidate.resolve())
    if name.startswith(("/", ".", "~")):
        raise ModelSourceError(
            f"model.name {name!r} looks like a folder, but no folder exists there. Give the path of a folder "
            "in Hugging Face format (config.json, *.safetensors, tokenizer files), relative to the "
            "parameters file or absolute."
        )
    official = transformer_lens_official_name(name)
    if official is not None:
        return ModelSource("hub", name, repo_id=official, tl_name=official)
    if _HUB_ID.match(name):
        return ModelSource("hub", name, repo_id=name)
    raise ModelSourceError(
        f"Unknown model {name!r}: it is neither {DEMO_MODEL!r} (the offline demo model), a local folder, a "
        "Hugging Face hub id ('owner/name'), nor a model TransformerLens knows (e.g. 'gpt2-small', "
        "'gemma-2-2b'). Fix `model.name` in the parameters file."
    )


def check_folder(folder: Path) -> str:
    """The architecture of a Hugging Face folder from its config.json; refuses a folder without config.json
    or weights, or of an unsupported architecture, before anything is read."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointNotFoundError(
            f"{folder} has no config.json: a model folder must be in Hugging Face format (config.json, "
            "model.safetensors or a sharded index, tokenizer files), e.g. as `save_pretrained` writes it."
        )
    if not list(folder.glob("*.safetensors")):
        raise CheckpointNotFoundError(
            f"{folder} has no .safetensors weights (only {sorted(p.name for p in folder.iterdir())}). Save "
            "the model with `save_pretrained` (safetensors is its default), or convert its .bin files."
        )
    try:
        config = json.loads(config_path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{config_path} is not valid JSON: {err}. Restore the file.") from err
    return detect_arch(config)


def model_folder(source: ModelSource, *, progress: bool = True) -> Path:
    """The local folder of a "local" or "hub" source, downloading a hub model (config first) when needed."""
    if source.kind == "local":
        return source.folder
    if source.kind != "hub":
        raise ValueError(f"model_folder needs a local or hub source, got {source.kind!r}")
    config_path = _download(source, lambda hub: hub.hf_hub_download(source.repo_id, "config.json"), progress,
                            what="config.json", step=1)
    try:
        detect_arch(json.loads(Path(config_path).read_text()))  # refused before its weights are fetched
    except CheckpointError as err:
        raise type(err)(f"{source.name} ({source.repo_id}): {err}") from None
    snapshot = lambda hub: hub.snapshot_download(source.repo_id, allow_patterns=ALLOW_PATTERNS)  # noqa: E731
    folder = _download(source, snapshot, progress, what="weights and tokenizer", step=2)
    check_folder(Path(folder))
    return Path(folder)


def _download(source: ModelSource, fetch, progress: bool, *, what: str, step: int):
    import huggingface_hub

    if progress:  # "n/m [" is the shape the book runner drops from pages (as tqdm's bars): live only
        print(f"[model] {step}/2 [{what}] {source.name} from the Hugging Face hub ({source.repo_id}) ...",
              file=sys.stderr, flush=True)
    try:
        return fetch(huggingface_hub)
    except Exception as err:  # offline, gated, missing repository, interrupted transfer: all say what to do
        raise ModelSourceError(
            f"Could not download {what} of model {source.name!r} (repository {source.repo_id}) from the "
            f"Hugging Face hub: {type(err).__name__}: {err}. Check the name and the connection (and unset "
            f"HF_HUB_OFFLINE). {_GATED_HINT}"
        ) from err


def supported_architectures() -> tuple[str, ...]:
    """config.json `model_type`s the weights-only route reads (plus the demo's llama2.c format)."""
    return SUPPORTED_ARCHS
