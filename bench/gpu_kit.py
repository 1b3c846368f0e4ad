"""Pack what `bench/gpu_checks.sh` needs on a GPU machine that has no internet: `.gpu/` in the repository
(ignored by git), to be copied there with the working tree.

    python bench/gpu_kit.py                 # writes .gpu/wheels and .gpu/shared, prints their size
    python bench/gpu_kit.py --have pip-list.txt --limit-mb 64

* `.gpu/wheels/`: CPython 3.12 x86-64 wheels (no dependencies resolved there: `pip install --no-deps`) of
  every package the book imports that the GPU machine's Python lacks: the runtime closure of the book's
  packages (transformer-lens, sae-lens, papermill, jupytext, ipykernel, plotly, rapidfuzz) as installed here,
  at the versions installed here, less the packages that machine already has (`--have`: a `pip list` or
  `pip freeze` of it; default `GPU_IMAGE`, a CUDA PyTorch image's list) and less `NOT_IMPORTED`;
* `.gpu/shared/`: the offline inputs the checks read (`SHARED_INPUTS`): the demo model, the GPT-2 tokenizer
  of the stand-ins and the stories the chapters read. `gpu_checks.sh` points WEIGHTSCOPE_MODELS and
  WEIGHTSCOPE_CORPORA there and installs the wheels into a folder of its own when the packages are missing.

The machine's own torch, transformers, numpy and pandas are used as they are (their versions go into the book
benchmark's results). Prints each part's size and the total with the tracked files, against `--limit-mb`
(what the transfer to that machine allows).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.markers import Marker

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / ".gpu"
ROOTS = ("transformer-lens", "sae-lens", "papermill", "jupytext", "ipykernel", "plotly", "rapidfuzz",
         "nbformat", "nbclient")
# installed here but not imported by the book's runner, its kernels or its chapters (the demo book ran
# without them, 2026-12-06); py2store and transformers-stream-generator publish no wheel, jedi (IPython's
# completions) and nltk are the largest
NOT_IMPORTED = {"debugpy", "py2store", "transformers-stream-generator", "jedi", "parso", "nltk", "babe",
                "graze", "dol", "config2py", "i2", "cwevals"}
# a CUDA PyTorch image's packages (the GPU machine of the benchmarks, 2026-11): torch and what it brings
GPU_IMAGE = set("""absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox
etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py
hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio interface-meta iniconfig jax
jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl
meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx
ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless
optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip
pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq
torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions
typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split())
SHARED_INPUTS = ("models/stories260K", "tokenizers/gpt2", "corpora/tinystories")
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "os_name": "posix"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_26_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")


def norm(name: str) -> str:
    """A distribution name as pip compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots, have: set[str]) -> dict[str, str]:
    """{name: installed version} of `roots` and everything they require on the target (extras left out),
    not in `have` or `NOT_IMPORTED`, from this environment's metadata."""
    found, todo = {}, [norm(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in found or name in have or name in NOT_IMPORTED:
            continue
        dist = md.distribution(name)
        found[name] = dist.version
        for req in dist.requires or []:
            spec, _, marker = req.partition(";")
            if marker and not Marker(marker).evaluate({**TARGET, "extra": ""}):
                continue
            todo.append(norm(re.split(r"[\s<>=!~\[(]", spec.strip())[0]))
    return dict(sorted(found.items()))


def read_have(path: Path | None) -> set[str]:
    """Package names from a `pip list` / `pip freeze` output, or `GPU_IMAGE`."""
    if path is None:
        return {norm(n) for n in GPU_IMAGE}
    names = (re.split(r"[\s=@]", line.strip())[0] for line in path.read_text().splitlines())
    return {norm(n) for n in names if n and not n.startswith(("#", "Package", "---"))}


def download(packages: dict[str, str], folder: Path) -> None:
    """Wheels of `packages` (exact versions, no dependencies) for the target into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", TARGET["python_version"], "--implementation", "cp", *platforms,
                    "-d", str(folder), *[f"{n}=={v}" for n, v in packages.items()]], check=True)


def copy_inputs(shared: Path, folder: Path) -> None:
    """The `SHARED_INPUTS` folders of `shared` into `folder`, same layout."""
    for part in SHARED_INPUTS:
        src = shared / part
        if not src.is_dir():
            raise SystemExit(f"{src} is missing: point --shared at the folder holding models/, corpora/, "
                             f"tokenizers/")
        shutil.copytree(src, folder / part, dirs_exist_ok=True)


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def tracked_mb() -> float:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    paths = [REPO / f for f in files.decode().split("\0") if f]
    return sum(p.stat().st_size for p in paths if p.is_file()) / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--have", type=Path, default=None,
                    help="the GPU machine's `pip list` (default: GPU_IMAGE)")
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="the offline inputs' folder")
    ap.add_argument("--limit-mb", type=float, default=64.0, help="what may travel to the machine, MiB")
    args = ap.parse_args(argv)
    packages = closure(ROOTS, read_have(args.have))
    shutil.rmtree(KIT, ignore_errors=True)
    download(packages, KIT / "wheels")
    copy_inputs(args.shared, KIT / "shared")
    parts = {"wheels": size_mb(KIT / "wheels"), "shared": size_mb(KIT / "shared"),
             "tracked files": tracked_mb()}
    total = sum(parts.values())
    print(f"{len(packages)} packages: " + ", ".join(f"{n}=={v}" for n, v in packages.items()))
    sizes = "  ".join(f"{k} {v:.1f} MiB" for k, v in parts.items())
    print(f"{sizes}  total {total:.1f} of {args.limit_mb} MiB")
    if total > args.limit_mb:
        print(f"over the limit by {total - args.limit_mb:.1f} MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
