"""A simulated accelerator, so that CPU-only test runs catch device bugs.

Code that works on CPU tensors can still fail on a CUDA GPU: `.numpy()` of a GPU tensor, an op mixing a CPU
and a GPU tensor, a CPU generator drawing on the GPU. Tests see such bugs only on a device that is not the
CPU. Here torch's lazy TorchScript backend (device "lazy", in torch's standard builds) stands in for
CUDA: its tensors are not CPU tensors, so every `device.type == "cpu"` branch takes the GPU's side, and it
refuses many mixes and `.numpy()` by itself. Where it lets through what CUDA refuses (`where`, `scatter_`,
`searchsorted`, index assignment, ... with a CPU operand; a CPU tensor indexed by device indices; a CPU
generator drawing on it), `DeviceCheck` raises.

    with simulated_device() as device:   # "lazy", the check on; the library's code may now use `device`
        run_the_code(device)

What it does not simulate: CUDA's numerics (its kernels, TF32, bf16 rounding; the lazy backend computes on
the CPU), memory (no out-of-memory error, no `torch.cuda.mem_get_info`), real kernels and their speed
(torch.compile, Triton), streams and asynchrony, more than one GPU. It is slower than the CPU (every op is
traced, then run by TorchScript), so give it tiny models.

Where the backend falls short of CUDA itself (a broken `split`, no copy into a CPU tensor, unknown to
safetensors and torch.compile, a slow way of reading results back), the simulation does as CUDA would
(`READS_BACK`, `BACKEND_FIXES`, `_backend_patches`): those gaps are the backend's, not the library's.
"""

from __future__ import annotations

import contextlib
import traceback
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import weightscope

DEVICE = "lazy"
LIBRARY = str(Path(weightscope.__file__).parent)  # as the frames name their files (not resolved)

# Calls given tensors on two devices that CUDA accepts: copies between devices (`module.to` sets each
# parameter's `.data`, after checking the two tensors' types). (A call with one tensor cannot mix devices.)
CROSS_DEVICE_OK = {"to", "copy_", "__set__", "_has_compatible_shallow_copy_type"}


class DeviceBugError(RuntimeError):
    """What CUDA would have refused, found on the simulated device."""


def _tensors(x, out: list) -> list:
    """Every tensor in x, looking into lists, tuples, dicts and slices (an index)."""
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, (list, tuple)):
        for y in x:
            _tensors(y, out)
    elif isinstance(x, dict):
        for y in x.values():
            _tensors(y, out)
    elif isinstance(x, slice):
        _tensors([x.start, x.stop, x.step], out)
    return out


def _on_device(t: torch.Tensor) -> bool:
    return t.device.type != "cpu"


def _lazy(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == DEVICE


def _generator_problem(name: str, args, kwargs) -> str | None:
    """CUDA draws only with a CUDA generator; the lazy backend takes a CPU one."""
    gen = kwargs.get("generator")
    if gen is None or gen.device.type != "cpu":
        return None
    device = kwargs.get("device")
    if device is not None and torch.device(device).type != "cpu":
        return f"{name}: a CPU generator drawing on {device}"
    if any(_on_device(t) for t in _tensors(list(args), [])):
        return f"{name}: a CPU generator drawing into a device tensor"
    return None


def _setitem_problem(args) -> str | None:
    """`x[key] = value`: a basic index copies across devices (fine on CUDA); an advanced one (a tensor in the
    key) is an index_put_, which wants the key on x's device (CPU indices into a CUDA x are moved) and the
    value on x's device unless it is a scalar."""
    x, key, value = args[0], args[1], args[2]
    keys = _tensors(key, [])
    if not _on_device(x) and any(_on_device(k) for k in keys):
        return "__setitem__: a CPU tensor indexed by device indices"
    if keys and isinstance(value, torch.Tensor) and value.dim() > 0 and _on_device(value) != _on_device(x):
        return f"__setitem__: an advanced index into a {x.device.type} tensor with {value.device.type} values"
    return None


def _mixing_problem(name: str, args, kwargs) -> str | None:
    """An op given device tensors and CPU tensors (CUDA accepts 0-dim CPU tensors as scalars, and a device
    tensor indexed by CPU indices)."""
    tensors = _tensors(list(args) + list(kwargs.values()), [])
    if not any(_on_device(t) for t in tensors):
        return None
    if name == "__setitem__":
        return _setitem_problem(args)
    if name == "__getitem__" and _on_device(args[0]):
        return None
    if any(not _on_device(t) and t.dim() > 0 for t in tensors):
        shapes = ", ".join(f"{t.device.type}{tuple(t.shape)}" for t in tensors)
        return f"{name}: mixes devices ({shapes})"
    return None


def _library_frame() -> traceback.FrameSummary | None:
    """The innermost frame of the library's own code on the stack (this file's aside), if any."""
    frames = [f for f in traceback.extract_stack()
              if f.filename.startswith(LIBRARY) and f.filename != __file__]
    return frames[-1] if frames else None


class DeviceCheck(TorchFunctionMode):
    """Raises `DeviceBugError` where the library's code does what CUDA refuses but the lazy backend allows,
    and does as CUDA would where the backend falls short (`BACKEND_FIXES`; `READS_BACK`, for speed).

    Only calls made from the library's frames count: tests may mix devices on purpose (to compare), and
    dependencies (TransformerLens, sae-lens) are not ours to fix. `found` lists every problem raised."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        problem = _problem(name, args, kwargs)
        frame = _library_frame() if problem else None
        if frame is not None:
            where = f"{Path(frame.filename).relative_to(Path(LIBRARY).parent)}:{frame.lineno}"
            self.found.append(f"{problem} at {where} ({frame.line})")
            raise DeviceBugError(f"simulated CUDA refuses it: {self.found[-1]}")
        if _reads_back(name, args, kwargs):
            torch._lazy.mark_step()
        if name in BACKEND_FIXES and _fix_applies(name, args):
            return BACKEND_FIXES[name](*args, **kwargs)
        return func(*args, **kwargs)


def _problem(name: str, args, kwargs) -> str | None:
    """What CUDA would refuse in this call, or None."""
    problem = _generator_problem(name, args, kwargs)
    if problem is None and name in ("numpy", "__array__") and _on_device(args[0]):
        problem = f"{name} of a {args[0].device.type} tensor"
    if problem is None and name not in CROSS_DEVICE_OK:
        problem = _mixing_problem(name, args, kwargs)
    return problem


# The backend computes a tensor only when it is read back, and each read recomputes all that the tensor
# depends on (statistic after statistic of the same scores, each from the start): `mark_step` first computes
# every pending tensor at once, so that later reads find them done (chapter 1 runs about twice as fast).
READS_BACK = {"cpu", "item", "tolist", "__bool__", "__int__", "__float__", "__index__"}


def _reads_back(name: str, args, kwargs) -> bool:
    """Whether the call copies a lazy tensor to the host (`.to("cpu")` included)."""
    if not (args and _lazy(args[0])):
        return False
    if name == "to":
        targets = [a for a in (*args[1:], kwargs.get("device")) if isinstance(a, (str, torch.device))]
        return any(torch.device(t).type == "cpu" for t in targets)
    return name in READS_BACK


# Ops the backend gets wrong where CUDA does not, done another way (the library's code is fine there).


def _copy_to_cpu(dest: torch.Tensor, src: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """`cpu_tensor.copy_(device_tensor)`, which the backend refuses (e.g. a checkpoint's tensors copied into
    a model built on the CPU and moved afterwards)."""
    return dest.copy_(src.cpu(), *args, **kwargs)


def _split(x: torch.Tensor, size=None, dim: int = 0, **named) -> tuple[torch.Tensor, ...]:
    """`split`: the backend's pieces are broken tensors that no later op accepts ("Input tensor is not a lazy
    tensor"); `tensor_split` makes correct ones."""
    size = size if size is not None else next(iter(named.values()))  # split_size, split_sizes, ...
    n = x.shape[dim]
    sizes = [size] * (n // size) + ([n % size] if n % size else []) if isinstance(size, int) else list(size)
    return x.tensor_split(torch.tensor(sizes[:-1]).cumsum(0).tolist(), dim)


def _chunk(x: torch.Tensor, chunks: int, dim: int = 0) -> tuple[torch.Tensor, ...]:
    """`chunk`, broken as `split` is: pieces of ceil(n / chunks) rows."""
    return _split(x, max(1, -(-x.shape[dim] // chunks)), dim)


def _unbind(x: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, ...]:
    """`unbind`, broken as `split` is."""
    return tuple(x.select(dim, i) for i in range(x.shape[dim]))


BACKEND_FIXES = {"copy_": _copy_to_cpu, "split": _split, "split_with_sizes": _split, "chunk": _chunk,
                 "unbind": _unbind}


def _fix_applies(name: str, args) -> bool:
    """copy_: from a lazy tensor into a CPU one; the others: of a lazy tensor."""
    if name == "copy_":
        return not _on_device(args[0]) and _lazy(args[1])
    return _lazy(args[0])


_started = []


def init_backend() -> None:
    """Start the lazy TorchScript backend, once a process (torch refuses a second start)."""
    import torch._lazy.ts_backend

    if not _started:
        torch._lazy.ts_backend.init()
        _started.append(True)


@contextlib.contextmanager
def simulated_device():
    """The simulated device's name ("lazy") with `DeviceCheck` on and the backend's gaps patched over."""
    init_backend()
    with pytest.MonkeyPatch.context() as mp:
        _backend_patches(mp)
        with DeviceCheck():
            yield DEVICE


def _backend_patches(mp: pytest.MonkeyPatch) -> None:
    """Where the backend falls short of CUDA outside torch's own calls (each told below)."""
    _sae_lens_reads_through_the_cpu(mp)
    _fused_statistics_uncompiled(mp)


class _SafeOpenViaCpu:
    """safetensors' `safe_open` for the simulated device, which safetensors does not know: it reads on the
    CPU and moves each tensor (CUDA reads straight to the device, to the same effect)."""

    def __init__(self, path, framework: str, device: str = "cpu"):
        from safetensors import safe_open

        self.device = device
        self.file = safe_open(path, framework=framework, device="cpu")

    def __enter__(self):
        self.file.__enter__()
        return self

    def __exit__(self, *exc):
        return self.file.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.file.get_tensor(name).to(self.device)


def _sae_lens_reads_through_the_cpu(mp: pytest.MonkeyPatch) -> None:
    from sae_lens.loading import pretrained_sae_loaders

    mp.setattr(pretrained_sae_loaders, "safe_open", _SafeOpenViaCpu)


def _fused_statistics_uncompiled(mp: pytest.MonkeyPatch) -> None:
    """torch.compile cannot trace the backend's tensors (dynamo: "meta converter nyi"; it warns and falls back
    after seconds of trying): the fused path of `token_score_stats` runs its formulas uncompiled instead."""
    from weightscope.compute import token_scores

    mp.setitem(token_scores._COMPILED, "moments", token_scores._moments_and_entropy_functional)
