"""Regenerate the stored nbval references `tests/nbval/NN_*.ipynb` from the demo book's executed chapters.

    .venv/bin/python tests/nbval_refresh.py [--chapters 00 01]        (or: make nbval-refresh)

Executes the demo chapters the way `make book` does (reusing cached executions that are still current), then
copies each executed notebook with its outputs into tests/nbval/, as `tests/nbval_sanitize.cfg` sanitizes
them (figures become a placeholder, paths of this checkout a REPO/ prefix, ...), without papermill's timing
metadata, with stable cell ids (a refresh changes only what changed). Cells whose output legitimately differs
between two preparations of the same inputs are tagged `nbval-ignore-output` (see IGNORE_OUTPUT). The demo
SAEs' fingerprint is stored with the references: `tests/test_nbval.py` fails when the book reads other SAEs
than the references were made from. The book reads the pinned demo SAEs (`data/demo_saes/`), so references
made on one machine hold on every other.

Run it after a change that is meant to move a printed result, and commit tests/nbval/ with that change.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REFERENCES = REPO / "tests" / "nbval"
EXECUTED = REPO / "book" / "demo"
SANITIZE = REPO / "tests" / "nbval_sanitize.cfg"
FIGURE = "<plotly figure>"  # what the sanitize file replaces every plotly output with
# (chapter stem, text in the cell's source, why its output is not compared)
# the cross-model page prints whatever targets and atlas rows this machine holds: not one fixed output
NOT_CHECKED = {"90_cross_model"}
IGNORE_OUTPUT = [
    ("00_demo_model", "training_time_s", "the demo SAEs' training time (seconds) differs on each training"),
    ("04_attention_saes", "quality = ch.sae_quality(ctx)", "its table shows each SAE's training time"),
]


def demo_sae_folders() -> list[Path]:
    """The folders of the demo SAEs the book reads: the residual ones (chapters 0-3, 6) and the attention ones
    (chapter 4); the pinned `data/demo_saes/{default,attn}/` unless a training with other parameters is
    used."""
    from weightscope.load.saes import demo_sae_folder

    return [demo_sae_folder(config) for config in ("default", "attn")]


def demo_sae_fingerprint() -> str:
    """sha256 over the demo SAEs' weight files: the references hold for these SAEs only."""
    digest = hashlib.sha256()
    for config, folder in zip(("default", "attn"), demo_sae_folders()):
        for path in sorted(folder.glob("layer_*/*.safetensors")):
            digest.update(f"{config}/{path.relative_to(path.parents[1]).as_posix()}".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _is_figure(output: dict) -> bool:
    return 'class="plotly-graph-div"' in "".join(output.get("data", {}).get("text/html", ""))


def _sanitize(output: dict) -> None:
    """Apply the sanitize patterns to an output's text, as nbval does before comparing (so no path of this
    checkout is stored; the patterns leave already sanitized text as it is)."""
    from nbval.plugin import get_sanitize_patterns

    patterns = get_sanitize_patterns(SANITIZE.read_text())

    def clean(text):
        text = "".join(text) if isinstance(text, list) else text
        for regex, replace in patterns:
            text = re.sub(regex, replace, text)
        return text

    if "text" in output:
        output["text"] = clean(output["text"])
    for mime, value in output.get("data", {}).items():
        if isinstance(value, (str, list)) and (mime.startswith("text/") or mime == "image/svg+xml"):
            output["data"][mime] = clean(value)


def reference(nb: dict, stem: str, fingerprint: str) -> dict:
    """The executed notebook nb as a stored reference: figures as placeholders, no timing metadata."""
    for index, cell in enumerate(nb["cells"]):
        cell["id"] = f"{stem[:2]}-{index:03d}"  # stable ids: a refresh changes only what changed
        cell.get("metadata", {}).pop("papermill", None)
        cell.get("metadata", {}).pop("execution", None)
        if cell["cell_type"] != "code":
            continue
        for output in cell["outputs"]:
            if _is_figure(output):
                output["data"]["text/html"] = FIGURE
            _sanitize(output)
        source = "".join(cell["source"])
        if any(stem == chapter and text in source for chapter, text, _ in IGNORE_OUTPUT):
            tags = cell["metadata"].setdefault("tags", [])
            if "nbval-ignore-output" not in tags:
                tags.append("nbval-ignore-output")
    nb["metadata"].pop("papermill", None)
    nb["metadata"]["weightscope"].pop("run_key", None)
    nb["metadata"]["weightscope"]["demo_sae_fingerprint"] = fingerprint
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chapters", nargs="*", help="chapter numbers (default: every chapter)")
    args = parser.parse_args(argv)
    book = [sys.executable, "-m", "weightscope.publish.book", "--target", "demo", "--no-html"]
    subprocess.run(book + (["--chapters", *args.chapters] if args.chapters else []), check=True)
    from weightscope.io import atomic_write_bytes
    from weightscope.publish.book import chapter_sources

    fingerprint = demo_sae_fingerprint()
    REFERENCES.mkdir(exist_ok=True)
    for source in chapter_sources():
        if source.stem in NOT_CHECKED:
            continue
        if args.chapters and source.stem[:2] not in args.chapters and source.stem not in args.chapters:
            continue
        nb = reference(json.loads((EXECUTED / f"{source.stem}.ipynb").read_text()), source.stem, fingerprint)
        text = json.dumps(nb, indent=1, ensure_ascii=False, sort_keys=True) + "\n"
        out = REFERENCES / f"{source.stem}.ipynb"
        atomic_write_bytes(out, text.encode())
        print(f"[nbval-refresh] {out.relative_to(REPO)} ({len(text) / 1e3:,.0f} kB)", flush=True)
    for stale in sorted(set(REFERENCES.glob("[0-9][0-9]_*.ipynb")) - {REFERENCES / f"{s.stem}.ipynb"
                                                                      for s in chapter_sources()
                                                                      if s.stem not in NOT_CHECKED}):
        stale.unlink()  # a chapter that no longer exists
        print(f"[nbval-refresh] removed {stale.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
