"""The whole book on a real-width stand-in: per chapter the wall time, peak memory, page weight and the FLOPs of
its main products, as a user running `python -m weightscope.publish.book` would meet them.

    python bench/bench_book.py --arch gpt2 --layers 1            # GPT-2-small width, 1 block, every chapter
    python bench/bench_book.py --arch gpt2 --layers 2 --chapters 01 02

A random checkpoint of the target's real width and vocabulary (`tests/realwidth.py`) and SAE folders in its
releases' formats and widths (encoders calibrated to a mean L0 of about 32, as released SAEs fire: the
results' `saes` entry records the L0 measured on random tokens) are written to a temporary folder (removed
afterwards; with `--work DIR` kept there with the chapters' tables, so that a later call with the same arch
and depth reuses the stand-in and can run the chapters that read an earlier call's tables, e.g. chapter 7
after chapters 1-3), named in a params file with `processing: auto` and `attn_saes`, and one book runner
executes the chapters in turn, as `make book` does (`--chapters ... --no-html --force`, chapter defaults: one
pre-flight, one start, a fresh kernel per chapter). Measured per chapter, between the runner's lines that start
and end it:

* wall: seconds from the chapter's start line to its end line (its kernel's start included; the runner's own
  start and pre-flight are the whole run's, `run`); cpu: the CPU seconds (user + system) of the runner and
  its kernel, each process at its last 0.2 s sample, which on a shared machine say more than the wall time
  (with every core to itself a chapter's wall time is about cpu / cores where its products use them all);
* peak RSS: the largest resident set of the runner and its kernel (sampled every 0.2 s since the previous
  chapter ended, leaving out that chapter's kernel, which may still be exiting; the kernel is where the
  chapter runs), and the largest sum over that process tree; peak GPU memory where the target runs on a GPU
  (`torch.cuda.max_memory_allocated` is in the kernel, so `GpuPeak` samples the card's used memory through
  NVML instead, less what was in use before the chapter started: the whole card, so run nothing else on it);
* flops: the main products' multiply-adds x 2, counted from the dimensions (`FLOP_MODEL` says which); FLOP/s =
  flops / wall, a lower bound on the rate of the products themselves;
* page_mb: the executed notebook's size (its figures' data included), what the HTML page will carry;
* slow_cells: the cells that took 2 s or more (papermill's durations), where the chapter's time went.

The whole run (`run`): the runner's wall and CPU seconds, start to exit: what a user waits for.

Results go to bench/results/book-<device>-<date>-<arch>-L<layers>.json (`weightscope.io.atomic_write_json`),
rewritten after each chapter (`"complete": false` until the last), so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

import harness  # bench/, beside this file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the stand-in builders
sys.path.insert(0, str(REPO / "lib"))

CHAPTER_STEMS = ("00_demo_model", "01_output_tokens", "02_attention", "03_semantic_populations",
                 "04_attention_saes", "05_context_neurons", "06_ffkv_baseline", "07_in_context")
FLOP_MODEL = {
    "01_output_tokens": "per SAE layer: 2 sides x (d_sae + 3 n_null) rows x d_model x d_vocab x 2 (three "
                        "null samples: the thresholds', and the random and shuffled rows scored by the rule)",
    "02_attention": "per (SAE layer, reading layer): (d_sae + 2 n_null) x d_model x (n_heads + 2 n_kv) d_head x 2 "
                    "+ the OV R-product (d_sae + 2 n_null) n_heads d_head^2 x 2; per SAE layer the QK pairs "
                    "n_pair_heads x d_sae^2 x d_head x 2",
    "04_attention_saes": "per attention-SAE layer: the write lens d_sae x d_model x d_vocab x 2; where a residual "
                         "SAE reads the stream after it, the residual reads of its features and of "
                         "min(d_sae, n_null_reads) null rows, (d_sae + min(d_sae, n_null_reads)) x d_model x "
                         "d_sae_res x 2; the held-out text and repeated sequences: their tokens x (the SAE's "
                         "encode n_heads d_head x d_sae x 2 + L blocks)",
    "06_ffkv_baseline": "per paired SAE layer l (its MLP block m = l - 1, or l for resid_post): the neuron lens "
                        "2 sides x d_mlp x d_model x d_vocab x 2; the reads of (d_sae + d_mlp + 2 n_null) rows "
                        "by each later layer, as chapter 2's; the alignment with blocks 0..m, d_sae x d_mlp x "
                        "d_model x 2 per block (the real pair once), and each side's null (as many rows) once "
                        "per block or SAE, 2 x d_sae x d_mlp x d_model x 2; the held-out checks on n_eval_tokens: "
                        "the SAE's encode, decode and its null's selection 3 x d_model x d_sae x 2, the MLP's "
                        "latents, two TopK decodes and their null's selection (mlp_mats - 1 + 3) x d_model x "
                        "d_mlp x 2, and the blocks through the last SAE's hook",
    "07_in_context": "the activation pass n_tokens x L x (block + encode d_model x d_sae x 2); the ablations, per "
                     "SAE layer l: n_ablate x ablate_positions x row_len / 2 tokens (each row cut after its "
                     "position) x (L blocks (the clean stream up to the site, the ablated one after it; "
                     "the clean final residual is the activation pass's) + the feature's activation at the "
                     "site: d_model x 2 from its encoder column (ReLU, JumpReLU), d_model x d_sae x 2 from "
                     "the whole encoder (TopK)); block = the weight matrices x 2 per token",
}


def dims(folder: Path) -> dict:
    """d_model, n_heads, n_kv, d_head, d_vocab, n_layers, d_mlp and mlp_mats (2, or 3 for a gated MLP) of a
    config.json."""
    hf = json.loads((folder / "config.json").read_text())
    if hf["model_type"] == "gpt2":
        return dict(d_model=hf["n_embd"], n_heads=hf["n_head"], n_kv=hf["n_head"], d_head=hf["n_embd"] // hf["n_head"],
                    d_vocab=hf["vocab_size"], n_layers=hf["n_layer"], d_mlp=hf.get("n_inner") or 4 * hf["n_embd"],
                    mlp_mats=2)
    heads = hf["num_attention_heads"]
    return dict(d_model=hf["hidden_size"], n_heads=heads, n_kv=hf.get("num_key_value_heads") or heads,
                d_head=hf.get("head_dim") or hf["hidden_size"] // heads, d_vocab=hf["vocab_size"],
                n_layers=hf["num_hidden_layers"], d_mlp=hf["intermediate_size"], mlp_mats=3)


def block_flops(d: dict) -> float:
    """FLOPs per token of one block's weight matrices (attention scores left out: short rows)."""
    attn = d["d_model"] * (2 * d["n_heads"] + 2 * d["n_kv"]) * d["d_head"]
    return 2.0 * (attn + d.get("mlp_mats", 2) * d["d_model"] * d.get("d_mlp", 4 * d["d_model"]))


def chapter_flops(stem: str, d: dict, d_sae: int, d_sae_att: int | None, hook_offset: int,
                  res_arch: str = "standard") -> float | None:
    """The main products' FLOPs of one chapter at the chapters' default settings (`FLOP_MODEL`); res_arch:
    the residual SAEs' sae-lens architecture (chapter 7's ablations read one encoder column of a ReLU or
    JumpReLU SAE, the whole encoder of a TopK one)."""
    from weightscope.chapters import attention, attention_saes, ffkv, in_context, output_tokens
    from weightscope.compute import lens
    from weightscope.load.saes import ONE_FEATURE_ARCHITECTURES

    L = d["n_layers"]
    if stem == "01_output_tokens":
        rows = d_sae + len(lens.NULL_ROLES) * output_tokens.Config().n_null
        return L * 2 * rows * d["d_model"] * d["d_vocab"] * 2.0
    if stem == "02_attention":
        c = attention.Config()
        rows = d_sae + 2 * c.n_null
        per_read = rows * d["d_model"] * (d["n_heads"] + 2 * d["n_kv"]) * d["d_head"] * 2.0
        per_read += rows * d["n_heads"] * d["d_head"] ** 2 * 2.0
        n_reads = sum(L - (layer + hook_offset) for layer in range(L))  # reading layers after each SAE
        return n_reads * per_read + L * c.n_pair_heads * d_sae**2 * d["d_head"] * 2.0
    if stem == "04_attention_saes" and d_sae_att:
        c = attention_saes.Config()
        after = L - 1 + hook_offset  # attention layers with a residual SAE right after them
        text = c.text_rows * c.text_ctx + c.induction_rows * (2 * c.induction_len + 1)  # held-out + repeated
        encode = text * d["n_heads"] * d["d_head"] * d_sae_att * 2.0  # hook_z is n_heads x d_head wide
        reads = (d_sae_att + min(d_sae_att, c.n_null_reads)) * d["d_model"] * d_sae * 2.0  # features, null
        lens = L * d_sae_att * d["d_model"] * d["d_vocab"] * 2.0
        return lens + after * reads + L * encode + text * L * block_flops(d)
    if stem == "06_ffkv_baseline":
        c, blocks = ffkv.Config(), [layer - 1 + hook_offset for layer in range(L) if layer - 1 + hook_offset >= 0]
        lens = len(blocks) * 2 * d["d_mlp"] * d["d_model"] * d["d_vocab"] * 2.0
        rows = d_sae + d["d_mlp"] + 2 * c.n_null
        per_read = rows * (d["d_model"] * (d["n_heads"] + 2 * d["n_kv"]) + d["n_heads"] * d["d_head"]) * d["d_head"]
        reads = sum(L - 1 - m for m in blocks) * per_read * 2.0
        pairs = sum(m + 1 for m in blocks) + 2 * len(blocks)  # real pairs, then each side's null once per set
        n, dm, dff = c.n_eval_tokens, d["d_model"], d["d_mlp"]
        # held-out checks per paired SAE: its code (encode, decode) and its null's atom selection; the MLP's
        # latents, its two TopK decodes and their one null's selection; the forward pass through the block of
        # the last SAE's hook (resid_pre of block m + 1 runs that block too: a block's hooks come from one run)
        checks = n * (3 * dm * d_sae + (d.get("mlp_mats", 2) - 1 + 3) * dm * dff) * 2.0
        run = max(blocks) + 2 - hook_offset if blocks else 0
        return lens + reads + pairs * d_sae * dff * dm * 2.0 + len(blocks) * checks + n * run * block_flops(d)
    if stem == "07_in_context":
        c = in_context.Config()
        passes = c.n_tokens * L * (block_flops(d) + 2.0 * d["d_model"] * d_sae)
        site = 2.0 * d["d_model"] * (1 if res_arch in ONE_FEATURE_ARCHITECTURES else d_sae)  # per token
        per_feature = c.ablate_positions * c.row_len / 2 * (L * block_flops(d) + site)
        return passes + c.n_ablate * per_feature * L  # per SAE layer: clean to the site, ablated after
    return None


REAL_TARGETS = {  # the real targets' dimensions, SAE widths, hook offset and residual SAE architecture
    "gpt2-small": (dict(d_model=768, n_heads=12, n_kv=12, d_head=64, d_vocab=50257, n_layers=12, d_mlp=3072,
                        mlp_mats=2), 24576, 24576, 0, "standard"),
    "gemma-2-2b": (dict(d_model=2304, n_heads=8, n_kv=4, d_head=256, d_vocab=256000, n_layers=26, d_mlp=9216,
                        mlp_mats=3), 16384, 16384, 1, "jumprelu"),
    "llama-3.1-8b": (dict(d_model=4096, n_heads=32, n_kv=8, d_head=128, d_vocab=128256, n_layers=32, d_mlp=14336,
                          mlp_mats=3), 32768, None, 1, "topk"),
}


def flops_table() -> str:
    """Markdown: each real target's main-product TFLOPs per chapter (`FLOP_MODEL`, all layers)."""
    stems = list(FLOP_MODEL)
    lines = ["| target (TFLOP) | " + " | ".join(f"chapter {int(s[:2])}" for s in stems) + " | total |",
             "|" + "---|" * (len(stems) + 2)]
    for name, (d, d_sae, d_att, offset, arch) in REAL_TARGETS.items():
        f = [chapter_flops(stem, d, d_sae, d_att, offset, arch) or 0.0 for stem in stems]
        lines.append(f"| {name} | " + " | ".join(f"{x / 1e12:,.1f}" for x in f) + f" | {sum(f) / 1e12:,.1f} |")
    return "\n".join(lines)


# What each chapter holds at once by design, for the memory check (`held`): "weights" the weights-only model
# (embeddings, unembedding, attention), "full" the forward-pass model (chapters 6 and 7 hold their weights-only
# model, at most the same size, and the full model one after the other), "sae" / "att_sae" one residual / hook_z
# SAE (chapters that load them one at a time: `SAESequence`), "saes" every residual SAE, "sae_group" the
# residual SAEs chapter 7's activation pass holds at once (as many as `sae_memory_mb` holds:
# `in_context.sae_groups`) and "streams" each batch's residual stream, kept between its groups
# ([n_tokens x d_model]; none in one group),
# and its largest working set:
# "chunk" the streaming budget (`compute.streaming.memory_budget`: 1 GiB on a CPU with 4 GiB free; chapter 6
# streams chapter 1's lens and encodes its held-out code in 64 MB chunks; chapter 4 streams its write lens and
# residual reads), "acts" chapter 4's layer pass (the activations over the held-out text,
# [rows x ctx x d_sae], encoded in 64 MB chunks), "budget" chapter 7's `memory_mb`, "final" chapter 7's final
# residual at every position of its text ([n_tokens x d_model], the clean side of its ablations); "sides" the
# lens's two matrices restricted to the content tokens (`lens.side_matrices`: [d_model x content tokens] each,
# gathered once per chapter; the real-width stand-ins' vocabularies are content tokens but for a few hundred
# byte pieces, so d_vocab is used), "unembed" the folded unembedding (`lens.output_matrix`, [d_model x
# d_vocab]), "normed" chapter 5's token embeddings through the block's linearised norm ([d_vocab x d_model],
# one copy at a time), "passes" what chapter 5 keeps of its forward passes over the calibration and every
# held-out text (`context_neurons.LayerPass`, per token: the MLP pre-activations, the residual and z, the
# attention pattern's row; at its notebook's defaults). Chapter 0 shows the weights-only model and its SAEs
# (`SAESequence`: one at a time), then drops it and builds the full model for generation. Chapter 6's
# weights-only tables wait on disk through its held-out checks (`io.set_aside`), so they are not counted.
HOLDS = {"00_demo_model": ("full", "sae"), "01_output_tokens": ("weights", "sae", "sides", "chunk"),
         "02_attention": ("weights", "sae", "chunk"), "03_semantic_populations": ("tables",),
         "04_attention_saes": ("full", "sae", "att_sae", "acts", "unembed", "chunk"),
         "05_context_neurons": ("full", "normed", "passes", "chunk"),
         "06_ffkv_baseline": ("full", "sae", "sides", "chunk"),
         "07_in_context": ("full", "sae_group", "streams", "budget", "final", "unembed")}


def held(stem: str, result: dict, parts: tuple[str, ...] | None = None) -> dict[str, float]:
    """Bytes of what `stem` holds at once by design on `result`'s target (`HOLDS`, or the given `parts`):
    tensors in fp32; "tables", the input tables as loaded (`tables_gb`, measured by `tables_rss_gb`; 0 in runs
    made before it was)."""
    from weightscope.chapters import attention_saes, ffkv, in_context
    from weightscope.compute.in_context import sae_groups

    d, w, L = result["dims"], result["saes"], result["n_layers"]
    emb = 2 * d["d_vocab"] * d["d_model"]  # embedding and unembedding
    attn = d["d_model"] * (2 * d["n_heads"] + 2 * d["n_kv"]) * d["d_head"]
    mlp = d.get("mlp_mats", 2) * d["d_model"] * d.get("d_mlp", 4 * d["d_model"])
    d_att_in = d["n_heads"] * d["d_head"]
    c4, c7 = attention_saes.Config(), in_context.Config()
    one_sae = 2 * d["d_model"] * w["d_sae"]
    groups = sae_groups(list(range(L)), [4 * one_sae] * L, int(c7.sae_memory_mb * 2**20))  # as chapter 7
    per_group = max(map(len, groups))
    sizes = {"weights": emb + L * attn, "full": emb + L * (attn + mlp),
             "sae": one_sae, "saes": L * one_sae, "sae_group": per_group * one_sae,
             "streams": c7.n_tokens * d["d_model"] if len(groups) > 1 else 0,
             "att_sae": 2 * d_att_in * (w["d_sae_att"] or 0), "chunk": 2**30 / 4,
             "acts": c4.text_rows * c4.text_ctx * (w["d_sae_att"] or 0),
             "budget": c7.memory_mb * 2**20 / 4, "final": c7.n_tokens * d["d_model"],
             "sides": 2 * d["d_model"] * d["d_vocab"], "unembed": d["d_model"] * d["d_vocab"],
             "normed": d["d_model"] * d["d_vocab"], "passes": chapter5_pass_floats(d),
             "tables": result["chapters"].get(stem, {}).get("tables_gb", 0.0) * 1e9 / 4}
    return {part: 4.0 * sizes[part] for part in (parts or HOLDS[stem])}


def chapter5_pass_floats(d: dict, nb: dict | None = None) -> float:
    """Floats chapter 5 keeps of its forward passes (`context_neurons.measure`) at its notebook's defaults (or
    `nb`'s n_calibration, heldout, n_heldout, window): per token of the calibration and held-out windows, the
    block's MLP pre-activations, residual, z and attention pattern row."""
    from weightscope.publish.book import notebook_defaults

    nb = nb or notebook_defaults(REPO / "notebooks" / "05_context_neurons.md")
    tokens = (nb["n_calibration"] + len(nb["heldout"]) * nb["n_heldout"]) * nb["window"]
    per_token = d.get("d_mlp", 4 * d["d_model"]) + d["d_model"] + d["n_heads"] * (d["d_head"] + nb["window"])
    return tokens * per_token


def expected_gb(stem: str, result: dict) -> float:
    """GB `stem` should peak at on `result`'s target: what it holds by design (`held`) plus the Python process
    with its libraries imported (`result["baseline_rss_gb"]`)."""
    return sum(held(stem, result).values()) / 1e9 + (result.get("baseline_rss_gb") or 0.0)


def tables_rss_gb(params: Path, env: dict) -> float:
    """GB the resident set of a fresh process grows by when it reads chapter 3's input tables as the chapter
    does (`populations.read_inputs`: Python strings for the token lists, so not their bytes on disk)."""
    code = ("import sys, yaml; from weightscope.chapters import populations\n"
            "rss = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1])\n"
            "before = rss(); tables = populations.read_inputs(yaml.safe_load(open(sys.argv[1]))['target'])\n"
            "print(rss() - before)")
    out = subprocess.run([sys.executable, "-c", code, str(params)], env=env, capture_output=True, text=True,
                         check=True)
    return round(int(out.stdout.strip().splitlines()[-1]) * 1024 / 1e9, 3)  # VmRSS is in kB


def memory_table(result: dict) -> str:
    """Markdown: per chapter its peak RSS beside what it holds by design (`held`) plus the Python process
    with its libraries imported (`result["baseline_rss_gb"]`), and their ratio."""
    base = result.get("baseline_rss_gb")
    lines = ["| chapter | holds (GB) | + imports | expected GB | peak RSS GB | peak / expected |",
             "|---|---|---|---|---|---|"]
    for stem in CHAPTER_STEMS:
        c = result["chapters"].get(stem)
        if c is None or c["rc"] != 0 or skipped(c):
            continue
        parts, expected = held(stem, result), expected_gb(stem, result)
        what = ", ".join(f"{k} {v / 1e9:.2f}" if v or k != "tables" else "tables not measured"
                         for k, v in parts.items())
        lines.append(f"| {stem} | {what} | {base if base is not None else '–'} | {expected:.2f} | "
                     f"{c['peak_rss_gb']:.2f} | {c['peak_rss_gb'] / expected:.2f} |")
    return "\n".join(lines)


class TreePeak:
    """Peak RSS of a process and its descendants, sampled every `interval` seconds in a thread, since the last
    `mark` (the previous chapter's end); and the CPU seconds (user + system) of every process of the tree seen
    so far, each at its last sample (a process's last 0.2 s may be missed)."""

    def __init__(self, pid: int, interval: float = 0.2):
        import psutil

        self.root, self.interval = psutil.Process(pid), interval
        self.max_one = self.max_sum = 0
        self._cpu: dict[int, float] = {}
        self._before: set[int] = set()  # descendants alive at the last mark: left out of the peaks
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def mark(self) -> None:
        """Start the peaks afresh: from now on they count the root and the processes started after this call
        (the previous chapter's kernel may still be exiting, with its memory)."""
        import psutil

        try:
            self._before = {p.pid for p in self.root.children(recursive=True)}
        except psutil.Error:
            self._before = set()
        self.max_one = self.max_sum = 0

    def cpu(self) -> float:
        return sum(self._cpu.values())

    def _run(self):
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                rss = []
                for p in procs:
                    try:
                        with p.oneshot():
                            t = p.cpu_times()
                            self._cpu[p.pid] = t.user + t.system
                            if p.pid not in self._before:
                                rss.append(p.memory_info().rss)
                    except psutil.Error:
                        pass
                self.max_one = max(self.max_one, max(rss, default=0))
                self.max_sum = max(self.max_sum, sum(rss))
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def stop(self):
        self._stop.set()
        self._thread.join()


class GpuPeak:
    """Peak used memory of GPU 0 above its level at the start, in bytes, sampled every `interval` seconds
    through NVML (nvidia-ml-py); `peak` stays None where NVML or a GPU is missing."""

    def __init__(self, interval: float = 0.2):
        self.peak, self.interval = None, interval
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no NVML library, no driver or no GPU: nothing to sample
            return
        self._start, self.peak = self._used(), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def mark(self) -> None:
        """Start the peak afresh (a new chapter)."""
        if self.peak is not None:
            self.peak = 0

    def _used(self) -> int:
        return self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._used() - self._start)
            self._stop.wait(self.interval)

    def stop(self):
        if self.peak is not None:
            self._stop.set()
            self._thread.join()


SHIPPED = {"gpt2": "gpt2-small.yaml", "gemma2": "gemma-2-2b.yaml", "llama": "llama-3.1-8b.yaml"}


STANDIN = "standin.json"  # in a --work folder: what the stand-in there is, written once it is complete


def standin(arch: str, n_layers: int, work: Path, keep: bool) -> tuple[Path, Path, dict, float]:
    """The stand-in of `build` in `work`: (params path, model folder, SAE widths, build seconds). keep: a
    --work folder, where a complete stand-in of the same arch and depth is reused (0 s) and a new one is
    recorded; one of another shape is an error, what an interrupted build left is replaced, and a folder
    holding anything else is refused (nothing of it is removed)."""
    marker = work / STANDIN
    if keep and marker.is_file():
        m = json.loads(marker.read_text())
        if (m["arch"], m["n_layers"]) != (arch, n_layers):
            raise SystemExit(f"{work} holds a {m['arch']} stand-in of {m['n_layers']} block(s), not {arch} of "
                             f"{n_layers}: name another --work folder, or empty this one")
        return work / m["params"], work / m["model"], m["widths"], 0.0
    parts = {f"realwidth-{arch}", "saes", "data", "book", f"realwidth-{arch}.yaml"}
    other = sorted(p.name for p in work.iterdir() if p.name not in parts) if keep else []
    if other:  # never remove what this benchmark did not write
        raise SystemExit(f"{work} holds files that are not a stand-in's ({', '.join(other[:3])}): name an empty "
                         f"--work folder, or one an earlier run made")
    for part in parts - {f"realwidth-{arch}.yaml"}:  # an interrupted build's leftovers
        shutil.rmtree(work / part, ignore_errors=True)
    t0 = time.perf_counter()
    params, folder, widths = build(arch, n_layers, work)
    build_s = time.perf_counter() - t0
    if keep:
        from weightscope.io import atomic_write_json

        atomic_write_json(marker, {"arch": arch, "n_layers": n_layers, "params": params.name,
                                   "model": str(folder.relative_to(work)), "widths": widths})
    return params, folder, widths, build_s


def build(arch: str, n_layers: int, tmp: Path) -> tuple[Path, Path, dict]:
    """Write the stand-in, its SAEs and params file under tmp: (params path, model folder, SAE widths)."""
    import realwidth

    target = f"realwidth-{arch}"
    folder = realwidth.build_model(arch, tmp / target, n_layers=n_layers)
    res, att = realwidth.build_release_saes(arch, folder, tmp / "saes")
    # device and dtype as the shipped params file of the real target says (bf16 on a GPU for Gemma and Llama;
    # on a CPU the chapters fall back to fp32 by themselves)
    shipped = yaml.safe_load((REPO / "params" / SHIPPED[arch]).read_text())
    params = realwidth.write_params(target, folder, res, tmp / f"{target}.yaml", attn_saes=att,
                                    device=shipped["device"], dtype=shipped["dtype"])
    rel = realwidth.RELEASES[arch]
    l0 = {kind: json.loads((f / "calibration.json").read_text())["mean_l0"]
          for kind, f in (("res", res), ("att", att)) if f is not None and (f / "calibration.json").is_file()}
    return params, folder, {"d_sae": rel["res"][1], "d_sae_att": rel["att"][1] if rel["att"] else None,
                            "res_hook": rel["res"][2], "res_arch": rel["res"][0], "mean_l0_random_tokens": l0}


def package_versions() -> dict[str, str | None]:
    """The installed versions of the packages the chapters' numbers depend on (a GPU machine brings its own)."""
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "transformer-lens", "sae-lens", "numpy", "pandas", "scipy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def baseline_rss_gb(env: dict) -> float:
    """Peak RSS of a fresh Python that imports what a chapter's kernel imports (ipykernel, torch,
    TransformerLens, sae-lens, plotly, pandas and every chapter module) and holds no tensor yet."""
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child forked from this (large) process
    # would report this process's resident set
    code = ("import ipykernel.kernelapp, torch, transformer_lens, sae_lens, plotly.express, pandas\n"
            "from weightscope.chapters import attention, attention_saes, context_neurons, ffkv, in_context, "
            "model_intro, output_tokens, populations\n"
            "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return round(int(out.stdout.strip().splitlines()[-1]) * 1024 / 1e9, 2)  # VmHWM is in kB


# the runner's lines around each chapter (`weightscope.publish.book._run_chapters`) and a skipped chapter's
START = re.compile(r"^\[book \d+/\d+\] \S+: (\S+) \.\.\.$")
END = re.compile(r"^\[book \d+/\d+\] \S+: (\S+) (executed|reused) \(\d+ s\)$")
SKIP = re.compile(r"^\[book\] \S+: (\S+) skipped: ")


QUIET_S = 11.0  # a wait between two terminal lines this long is listed: longer than a bar's 10 s cadence


def run_book(stems: list[str], params: Path, env: dict, log: Path, done=None,
             cmd: list[str] | None = None, quiet_s: float = QUIET_S) -> tuple[dict[str, dict], dict]:
    """The chapters through one book runner, as `make book` runs them (one pre-flight, one start):
    ({stem: rc, wall, cpu, peak memory, longest silence, last lines}, {rc, wall_s, cpu_s of the whole run}). A
    chapter's wall time runs from the runner's line that starts it to the line that ends it (kernel start
    included); its longest silence is the longest wait between two of its lines (what a user watching the
    terminal waits for), with the line that came before (`silent_after`), and every wait of at least
    `quiet_s` (`silences`: [[s, the line before], ...], longest first, at most 10); a chapter that failed
    is timed to the runner's exit, and the chapters after it are not run. `done(stem, entry)` is called as
    each chapter ends (while the next one runs). cmd: the runner's command (default: the book runner on
    `params`; a test passes a stand-in that prints the same lines)."""
    cmd = cmd or [sys.executable, "-m", "weightscope.publish.book", "--target", str(params), "--chapters",
                  *[s[:2] for s in stems], "--no-html", "--force"]
    import resource

    chapters, lines, current = {}, [], None
    start, cpu0 = time.perf_counter(), _children_cpu(resource)
    heard, silence, waits = start, (0.0, ""), []
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                text=True, errors="replace")
        peak, gpu = TreePeak(proc.pid), GpuPeak()
        later = ThreadPoolExecutor(1)  # `done` calls, one at a time, in order
        for line in proc.stdout:
            out.write(line)
            out.flush()
            lines.append(line.rstrip("\n"))
            now, text = time.perf_counter(), line.strip()
            if current is not None and now - heard > silence[0]:
                silence = (now - heard, lines[-2].strip())
            if current is not None and now - heard >= quiet_s:
                waits.append([round(now - heard, 1), lines[-2].strip()])
            heard = now
            if m := START.match(text):
                current, t0, c0, first = m.group(1), now, peak.cpu(), len(lines)
                silence, waits = (0.0, text), []
            elif (m := END.match(text)) and m.group(1) == current:
                chapters[current] = _chapter(0, now - t0, peak.cpu() - c0, peak, gpu, lines[first - 1:][-3:])
                chapters[current].update(longest_silence_s=round(silence[0], 1), silent_after=silence[1],
                                         silences=sorted(waits, key=lambda w: -w[0])[:10])
                peak.mark(), gpu.mark()  # the next chapter's peaks: its kernel cannot have started yet
                print(f"  {current}: {_summary(chapters[current])}", flush=True)
                if done:  # in a thread of its own: the next line's time is taken as it arrives
                    later.submit(done, current, chapters[current])
                current = None
            elif m := SKIP.match(text):
                chapters[m.group(1)] = _not_timed(0, [text])
        rc = proc.wait()
        peak.stop()
        gpu.stop()
        later.shutdown(wait=True)
    run = {"rc": rc, "wall_s": round(time.perf_counter() - start, 1),
           "cpu_s": round(_children_cpu(resource) - cpu0, 1)}
    if current is not None:  # the chapter that failed: its traceback is in the lines since it started
        chapters[current] = _chapter(rc or 1, time.perf_counter() - t0, peak.cpu() - c0, peak, gpu,
                                     lines[first - 1:][-30:])
    for stem in stems:  # not reached: an earlier chapter failed, or the pre-flight stopped the run
        chapters.setdefault(stem, {**_not_timed(rc or 1, lines[-30:]), "not_run": True})
    if done:
        for stem in stems:
            done(stem, chapters[stem])  # again for those done during the run: idempotent
    return {stem: chapters[stem] for stem in stems}, run


def _not_timed(rc: int, tail: list[str]) -> dict:
    """The entry of a chapter the runner skipped (rc 0) or never reached."""
    return {"rc": rc, "wall_s": 0.0, "cpu_s": 0.0, "peak_rss_gb": 0.0, "peak_tree_rss_gb": 0.0,
            "peak_gpu_gb": None, "last_lines": tail}


def _chapter(rc: int, wall: float, cpu: float, peak: TreePeak, gpu: GpuPeak, tail: list[str]) -> dict:
    return {"rc": rc, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "peak_rss_gb": round(peak.max_one / 1e9, 2),
            "peak_tree_rss_gb": round(peak.max_sum / 1e9, 2),
            "peak_gpu_gb": None if gpu.peak is None else round(gpu.peak / 1e9, 2), "last_lines": tail}


def _summary(r: dict) -> str:
    gpu = f"  GPU {r['peak_gpu_gb']} GB" if r["peak_gpu_gb"] is not None else ""
    quiet = f"  silent {r['longest_silence_s']} s at most" if "longest_silence_s" in r else ""
    return f"rc {r['rc']}  {r['wall_s']} s  cpu {r['cpu_s']} s  peak {r['peak_rss_gb']} GB{gpu}{quiet}"


def slow_cells(page: Path, at_least: float = 2.0) -> list[dict]:
    """The executed notebook's cells that took at least `at_least` s (papermill's per-cell durations), with
    their first line: where a chapter's time went."""
    nb = json.loads(page.read_text())
    out = []
    for i, cell in enumerate(nb["cells"]):
        duration = cell.get("metadata", {}).get("papermill", {}).get("duration")
        if duration is not None and duration >= at_least:
            source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            first = source.strip().split("\n")[0][:100]
            out.append({"cell": i, "s": round(duration, 1), "first_line": first})
    return out


def skipped(chapter: dict) -> bool:
    """Whether the runner skipped the chapter (exit 0 without a page: the pre-flight found it does not apply,
    e.g. chapter 6 with one SAE before the first MLP)."""
    return chapter["rc"] == 0 and chapter.get("page_mb") is None


def table(results: list[dict]) -> str:
    """Markdown: a line saying what a cell holds, then one row per chapter, one column per results file
    (depths side by side), and the per-layer fit t(L) = a + b L from two depths when there are two."""
    results = sorted(results, key=lambda r: (r["n_layers"], r["date"]))
    fit = len(results) == 2 and results[0]["n_layers"] != results[1]["n_layers"]
    def label(r):  # the results file without its common parts, else the run's date
        return r["file"].removeprefix("book-").removesuffix(".json") if "file" in r else r["date"]

    head = "| chapter | " + " | ".join(f"L={r['n_layers']} ({label(r)})" for r in results)
    lines = ["Each cell: wall s · CPU s · peak RSS GB · page MB · GFLOP per CPU s.", "",
             head + (" | CPU s per layer | fixed CPU s |" if fit else " |")]
    lines.append("|" + "---|" * (len(results) + 1 + 2 * fit))
    for stem in CHAPTER_STEMS:
        cells, walls = [], []
        for r in results:
            c = r["chapters"].get(stem)
            if c is None:
                cells.append("not run")
                continue
            ok = c["rc"] == 0 and not skipped(c)
            flops = run_flops(stem, r)
            rate = f"{flops / c['cpu_s'] / 1e9:.1f}" if flops and ok and c.get("cpu_s") else "–"
            status = "" if ok else " (skipped by the pre-flight)" if skipped(c) else f" (failed, rc {c['rc']})"
            page = "–" if c.get("page_mb") is None else f"{c['page_mb']:.2f}"
            cells.append(f"{c['wall_s']:.0f} · {c.get('cpu_s', float('nan')):.0f} · {c['peak_rss_gb']:.2f} · "
                         f"{page} · {rate}{status}")
            walls.append((r["n_layers"], c.get("cpu_s")) if ok else None)
        row = f"| {stem} | " + " | ".join(cells) + " |"
        if fit:
            if len(walls) == 2 and None not in walls:
                (l1, t1), (l2, t2) = walls
                b = (t2 - t1) / (l2 - l1)
                row += f" {b:.0f} | {t1 - b * l1:.0f} |"
            else:
                row += " – | – |"
        lines.append(row)
    runs, fill = [r.get("run") for r in results], " – | – |" if fit else ""
    if any(runs):  # one runner for every chapter: its whole time, start and pre-flight included
        cells = [f"{r['wall_s']:.0f} · {r['cpu_s']:.0f}" if r else "one runner per chapter" for r in runs]
        lines.append("| whole run (wall s · CPU s) | " + " | ".join(cells) + " |" + fill)
    machines = [r.get("machine", {}).get("cpu") for r in results]  # recorded since 2026-12-07
    if any(machines):
        cells = [f"{m} ({r['machine']['cpu_capability']})" if m else "not recorded"
                 for m, r in zip(machines, results)]
        lines.append("| machine (CPU, vector instructions) | " + " | ".join(cells) + " |" + fill)
    return "\n".join(lines)


def silences(result: dict) -> str:
    """Markdown: per chapter, the longest wait between two lines of the runner's terminal (`run_book`) and the
    line it followed: a long step without progress shows as a long silence after its last line."""
    lines = [f"| chapter | wall s | longest silence s | after the line | waits of {QUIET_S:.0f} s or more |",
             "|---|---|---|---|---|"]
    for stem, c in result["chapters"].items():
        if "longest_silence_s" in c:
            after = c["silent_after"].replace("|", "\\|")
            waits = (", ".join(f"{s:.1f}" for s, _ in c["silences"] if s >= QUIET_S) if "silences" in c
                     else "not recorded")
            lines.append(f"| {stem} | {c['wall_s']:.0f} | {c['longest_silence_s']:.1f} | `{after[:90]}` | "
                         f"{waits or 'none'} |")
    return "\n".join(lines)


# What each chapter's work grows with, for `--extrapolate` from one depth: "model" (chapter 0 introduces the
# model, chapter 5 reads one block: their work is loading the model, which grows with its bytes,
# `model_bytes`), "layers" (one pass per SAE layer), "flops" (`chapter_flops`: chapter 2's and 6's (SAE layer,
# reading layer) reads, chapter 6's (SAE, earlier block) alignment and chapter 7's ablation passes grow as
# L(L+1)/2).
SCALING = {"00_demo_model": "model", "01_output_tokens": "layers", "02_attention": "flops",
           "03_semantic_populations": "layers", "04_attention_saes": "layers", "05_context_neurons": "model",
           "06_ffkv_baseline": "flops", "07_in_context": "flops"}


def at_depth(result: dict, n_layers: int) -> dict:
    """`result` as if its stand-in had n_layers blocks (its dims and the per-layer input tables of chapter 3
    scaled), for `held` and the FLOP model."""
    scale = n_layers / result["n_layers"]
    chapters = {stem: ({**c, "tables_gb": c["tables_gb"] * scale} if c.get("tables_gb") else c)
                for stem, c in result["chapters"].items()}
    return {**result, "n_layers": n_layers, "dims": {**result["dims"], "n_layers": n_layers},
            "chapters": chapters}


# The models a chapter scaled by "model" loads, one after the other (chapter 0 holds one at a time).
LOADS = {"00_demo_model": ("weights", "full"), "05_context_neurons": ("full",)}


def model_bytes(stem: str, result: dict) -> float:
    """Bytes of the models `stem` loads (`LOADS`), in fp32."""
    return sum(held(stem, result, LOADS[stem]).values())


def run_flops(stem: str, result: dict, n_layers: int | None = None) -> float | None:
    """`chapter_flops` of a results file's target (at depth n_layers; default: the run's), from today's
    FLOP model, so that files written before a chapter had one get its rate too."""
    d = {**result["dims"], "n_layers": n_layers or result["n_layers"]}
    offset = 0 if result["saes"]["res_hook"].endswith("resid_pre") else 1
    saes = result["saes"]
    return chapter_flops(stem, d, saes["d_sae"], saes["d_sae_att"], offset, res_arch(result))


def res_arch(result: dict) -> str:
    """The residual SAEs' architecture of a results file: recorded, else its stand-in release's (files
    written before it was recorded), else "standard"."""
    import realwidth

    release = realwidth.RELEASES.get(result.get("arch"))
    return result["saes"].get("res_arch") or (release["res"][0] if release else "standard")


def units(stem: str, result: dict, n_layers: int) -> float:
    """How much of `stem`'s work a target like `result`'s has at depth n_layers (`SCALING`)."""
    kind = SCALING[stem]
    if kind == "model":
        return model_bytes(stem, at_depth(result, n_layers))
    if kind == "layers":
        return float(n_layers)
    return run_flops(stem, result, n_layers)


def extrapolate(results: list[dict], n_layers: int) -> str:
    """Markdown: each chapter's CPU seconds at depth n_layers from the runs where it passed (the latest per
    depth). Measured at two depths (the two deepest, L1 < L2): the line through both in `units`,
    cpu(N) = cpu(L1) + (cpu(L2) - cpu(L1)) x (units(N) - units(L1)) / (units(L2) - units(L1)), which splits
    start-up from per-layer work. At one depth: cpu(N) = cpu(L) x units(N) / units(L), every second scaled,
    start-up included: an upper bound for the chapters that grow."""
    lines = [f"| chapter | grows with | measured at L | CPU s there | CPU s at L={n_layers} | how |",
             "|---|---|---|---|---|---|"]
    total, bound = 0.0, False
    for stem in CHAPTER_STEMS:
        by_depth = {r["n_layers"]: r for r in sorted(results, key=lambda r: (r["n_layers"], r["date"]))
                    if r["chapters"].get(stem, {}).get("rc") == 0 and not skipped(r["chapters"][stem])
                    and units(stem, r, r["n_layers"]) > 0}  # a run with none of the work scales nothing
        if not by_depth:
            lines.append(f"| {stem} | {SCALING[stem]} | – | – | not measured | |")
            continue
        runs = [by_depth[d] for d in sorted(by_depth)][-2:]
        cpu = [r["chapters"][stem]["cpu_s"] for r in runs]
        u = [units(stem, r, r["n_layers"]) for r in runs]
        u_n = units(stem, runs[-1], n_layers)
        if len(runs) == 2 and u[1] != u[0]:
            est = cpu[0] + (cpu[1] - cpu[0]) * (u_n - u[0]) / (u[1] - u[0])
            how = "line through both depths"
        else:
            est, how, bound = cpu[-1] * u_n / u[-1], "scaled (upper bound)", True
        total += est
        depths = " and ".join(str(r["n_layers"]) for r in runs)
        there = " and ".join(f"{c:,.0f}" for c in cpu)
        lines.append(f"| {stem} | {SCALING[stem]} | {depths} | {there} | {est:,.0f} | {how} |")
    lines.append(f"| all measured chapters | | | | {total:,.0f} ({total / 3600:.1f} h) | "
                 f"{'includes upper bounds' if bound else ''} |")
    return "\n".join(lines)


def memory_at(results: list[dict], n_layers: int) -> str:
    """Markdown: each chapter's peak RSS at depth n_layers, from the deepest run where it passed (of equally
    deep runs, the one given last): what it holds there by design (`held` at that depth) plus the imports,
    times that run's measured peak / expected. The ratio is the measured overhead of the chapter's working
    copies, taken to stay the same when the held tensors grow."""
    lines = [f"| chapter | from | expected GB there | peak RSS GB there | peak / expected | "
             f"expected GB at L={n_layers} | estimated peak GB at L={n_layers} |", "|---" * 7 + "|"]
    for stem in CHAPTER_STEMS:
        ran = [(r["n_layers"], i, r) for i, r in enumerate(results)
               if (c := r["chapters"].get(stem)) is not None and c["rc"] == 0 and not skipped(c)]
        if not ran:
            continue
        result = max(ran, key=lambda t: t[:2])[2]
        now, then = expected_gb(stem, result), expected_gb(stem, at_depth(result, n_layers))
        peak = result["chapters"][stem]["peak_rss_gb"]
        lines.append(f"| {stem} | {result.get('file', '')} (L={result['n_layers']}) | {now:.2f} | "
                     f"{peak:.2f} | {peak / now:.2f} | {then:.2f} | {then * peak / now:.2f} |")
    return "\n".join(lines)


def floor(result: dict) -> str:
    """Markdown: each chapter's wall time beside what it would take if its products ran at the best rate any
    chapter of the run reached (FLOPs per CPU second) on all of the machine's CPUs, flops / (best x cpus);
    chapters without a FLOP model at their measured wall time. The total is how fast the book could be on that
    machine with its products as they are."""
    ok = {stem: c for stem, c in result["chapters"].items() if c["rc"] == 0 and not skipped(c)}
    flops = {stem: run_flops(stem, result) for stem in ok}
    best = max((f / ok[s]["cpu_s"] for s, f in flops.items() if f and ok[s].get("cpu_s")), default=None)
    if best is None:
        return "No chapter with a FLOP model ran."
    cpus = result["machine"]["cpus"]
    lines = [f"Best rate: {best / 1e9:.1f} GFLOP per CPU second x {cpus} CPUs = "
             f"{best * cpus / 1e9:.1f} GFLOP/s.", "",
             "| chapter | TFLOP | wall s | wall s at the best rate |", "|---|---|---|---|"]
    wall = at_best = 0.0
    for stem, c in ok.items():
        t = flops[stem] / (best * cpus) if flops[stem] else c["wall_s"]
        wall, at_best = wall + c["wall_s"], at_best + t
        tflop = f"{flops[stem] / 1e12:.1f}" if flops[stem] else "–"
        lines.append(f"| {stem} | {tflop} | {c['wall_s']:,.0f} | {t:,.0f} |")
    if "run" in result:  # the runner's start, pre-flight and the lines between chapters: no products
        rest = result["run"]["wall_s"] - wall
        wall, at_best = wall + rest, at_best + rest
        lines.append(f"| the runner outside the chapters | – | {rest:,.0f} | {rest:,.0f} |")
    lines.append(f"| all | | {wall:,.0f} ({wall / 60:.1f} min) | {at_best:,.0f} ({at_best / 60:.1f} min) |")
    return "\n".join(lines)


def _children_cpu(resource) -> float:
    """User + system CPU seconds of every finished descendant (the runner reaps its kernel)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="gpt2", choices=("gpt2", "gemma2", "llama"))
    ap.add_argument("--layers", type=int, default=1, help="blocks of the stand-in (SAEs on every one)")
    ap.add_argument("--chapters", nargs="*", default=None, help="chapter numbers (default: all)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default: bench/results/book-...)")
    ap.add_argument("--tmp", type=Path, default=None, help="where the temporary stand-in goes")
    ap.add_argument("--work", type=Path, default=None,
                    help="keep the stand-in, its SAEs and the chapters' tables in this folder (not removed): a "
                         "later run with the same --arch and --layers reuses the stand-in and can run chapters "
                         "that read the tables of the chapters an earlier run ran")
    ap.add_argument("--logs", type=Path, default=None, help="keep each chapter's runner log in this folder")
    ap.add_argument("--table", type=Path, nargs="+", default=None, help="print results files as markdown")
    ap.add_argument("--extrapolate", type=int, default=None, metavar="N",
                    help="with --table: each chapter's CPU seconds and peak RSS scaled to N layers")
    args = ap.parse_args(argv)
    if args.tmp is not None and not args.tmp.is_dir():
        ap.error(f"--tmp {args.tmp} is not a folder: create it, or leave --tmp out for the system's "
                 "temporary folder")
    if args.table:
        results = [{**json.loads(p.read_text()), "file": p.name} for p in args.table]
        print(table(results) + "\n\n" + flops_table())
        for r in results:
            print(f"\nMemory at L={r['n_layers']} ({r['file']}):\n" + memory_table(r))
            print(f"\nAt the best rate, L={r['n_layers']} ({r['file']}):\n" + floor(r))
            if any("longest_silence_s" in c for c in r["chapters"].values()):
                print(f"\nLongest silences, L={r['n_layers']} ({r['file']}):\n" + silences(r))
        if args.extrapolate:
            print("\n" + extrapolate(results, args.extrapolate))
            print(f"\nMemory at L={args.extrapolate}:\n" + memory_at(results, args.extrapolate))
        return 0

    import torch

    from weightscope.io import atomic_write_json

    stems = [s for s in CHAPTER_STEMS if args.chapters is None or s[:2] in args.chapters]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    date = datetime.date.today().isoformat()
    out = args.out or REPO / "bench" / "results" / f"book-{device}-{date}-{args.arch}-L{args.layers}.json"
    load_start = os.getloadavg()
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
    folder_cm = (contextlib.nullcontext(str(args.work)) if args.work
                 else tempfile.TemporaryDirectory(prefix="bench-book-", dir=args.tmp))
    with folder_cm as tmp_name:
        tmp = Path(tmp_name)
        params, folder, widths, build_s = standin(args.arch, args.layers, tmp, keep=args.work is not None)
        d = dims(folder)
        written = yaml.safe_load(params.read_text())  # the device and dtype the chapters were asked for
        book = tmp / "book"  # a book folder of its own, as the stand-in tests do
        book.mkdir(exist_ok=True)
        for name in ("_config.yml", "intro.md", "_ext", "_css", "appendix"):
            src = REPO / "book" / name
            if src.is_dir():
                shutil.copytree(src, book / name, dirs_exist_ok=True)
            elif src.exists():
                shutil.copy(src, book / name)
        env = {**os.environ, "WEIGHTSCOPE_DATA": str(tmp / "data"), "WEIGHTSCOPE_BOOK": str(book),
               "HF_HUB_OFFLINE": "1", "WEIGHTSCOPE_PROGRESS": "1",  # as a user sees it (silences measured)
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "lib"), os.environ.get("PYTHONPATH")]))}
        offset = 0 if widths["res_hook"].endswith("resid_pre") else 1
        baseline = baseline_rss_gb(env)
        chapters = {}
        result = {
            "benchmark": "book", "arch": args.arch, "n_layers": args.layers, "device": device, "date": date,
            "dims": d, "saes": widths, "build_s": round(build_s, 1), "flop_model": FLOP_MODEL,
            "standin_reused": build_s == 0.0,
            "params": {k: written[k] for k in ("device", "dtype")},
            "baseline_rss_gb": baseline, "holds": {stem: list(HOLDS[stem]) for stem in stems},
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                        "cpu": harness.cpu_name(), "cpu_capability": harness.cpu_capability(),
                        "packages": package_versions(),
                        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
                        "load_avg_start": load_start,
                        "note": "a shared machine: other jobs ran at the same time; times are upper bounds"},
            "chapters": chapters, "complete": False,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.logs:
            args.logs.mkdir(parents=True, exist_ok=True)

        def done(stem: str, r: dict) -> None:  # page, FLOPs, rate; the results so far survive an interruption
            page = next((book / params.stem).glob(f"{stem}*.ipynb"), None)
            ran = r["rc"] == 0 and page is not None and r["wall_s"] > 0
            r["page_mb"] = round(page.stat().st_size / 1e6, 2) if ran else None
            r["slow_cells"] = slow_cells(page) if ran else []
            r["flops"] = chapter_flops(stem, d, widths["d_sae"], widths["d_sae_att"], offset,
                                       widths["res_arch"])
            r["gflop_per_s"] = round(r["flops"] / r["wall_s"] / 1e9, 2) if r["flops"] and ran else None
            chapters[stem] = r
            atomic_write_json(out, result)

        print(f"{len(stems)} chapter(s) through one book runner ...", flush=True)
        _, result["run"] = run_book(stems, params, env, (args.logs or tmp) / "book.log", done)
        for stem in stems:  # after the run: measuring it in a second process would slow the next chapter
            if "tables" in HOLDS[stem] and chapters[stem]["page_mb"] is not None:
                chapters[stem]["tables_gb"] = tables_rss_gb(params, env)
        print(f"  the whole run: rc {result['run']['rc']}  {result['run']['wall_s']} s  "
              f"cpu {result['run']['cpu_s']} s", flush=True)
    result["machine"]["load_avg_end"] = os.getloadavg()
    result["complete"] = True
    atomic_write_json(out, result)
    print(f"wrote {out}")
    return 0 if result["run"]["rc"] == 0 and all(r["rc"] == 0 for r in chapters.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
