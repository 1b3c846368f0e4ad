"""Chapter opening: device and dtype choices, and a chapter that fails leaves the book as it was."""

import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from weightscope.publish.book import BOOK, REPO_ROOT
from weightscope.chapters.context import resolve_device, resolve_dtype


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_request_without_gpu_is_refused_clearly():
    with pytest.raises(RuntimeError, match="no CUDA GPU is visible.*`device: auto`"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_half_precision_falls_back_to_float32_on_cpu():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.float32
    assert "using float32 instead" in str(caught[0].message)


@pytest.mark.slow
def test_failing_chapter_exits_nonzero_and_leaves_no_partial_notebook(tmp_path):
    """An impossible chapter parameter (k larger than the vocabulary) is refused before any work (exit 2)."""
    params = tmp_path / "broken-demo.yaml"
    text = (REPO_ROOT / "params" / "demo.yaml").read_text()
    params.write_text(text.replace("target: demo", "target: broken-demo")
                      .replace("chapters: {}", "chapters: {01_output_tokens: {k: 100000}}"))
    out = BOOK / "broken-demo"
    try:
        proc = subprocess.run([sys.executable, "-m", "weightscope.publish.book", "--target", str(params), "--chapters", "01",
                               "--no-html"], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "chapters.01_output_tokens: need 1 <= k <= d_vocab (512); got k=100000" in proc.stderr
        assert "nothing was run" in proc.stderr
        assert not (out / "01_output_tokens.ipynb").exists()
        assert "without encryption" not in proc.stderr  # ipykernel's TCP notice is filtered in the kernel
    finally:
        shutil.rmtree(out, ignore_errors=True)
