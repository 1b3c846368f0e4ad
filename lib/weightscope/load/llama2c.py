"""Reading llama2.c checkpoints and tokenizers (Karpathy's `run.c` formats), with no pickle and no torch.load.

Two files make up a llama2.c model:

- the *legacy checkpoint* (`stories260K.bin`): a header of 7 little-endian int32 followed by float32 tensors;
- the *tokenizer* (`tok512.bin`): one int32, then for each token a float32 merge score, an int32 length
  and the UTF-8 bytes of its piece.

`read_checkpoint` and `read_tokenizer` check sizes (against what the header implies), sha256 (when an
expected value is given) and finiteness, and raise `Llama2cFileError` saying what is wrong and what to do.

`Llama2cEncoder` reproduces `run.c`'s encoder exactly (BOS, dummy-prefix space, byte fallback, greedy merge
of the best-scoring adjacent pair) and its decoder. Its fast path caches the encoding of space-delimited
chunks; it is used only when the vocabulary guarantees that no merge can cross a chunk boundary.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import hf_hub_download

from weightscope.config import paths

# sha256 of the published stories260K files (shared models README; hub repo karpathy/tinyllamas).
KNOWN_SHA256 = {
    "stories260K.bin": "b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696",
    "tok512.bin": "037cb335abb25d1fa9e8ecae30ed2a3a8ace9302862ebcdc05d51a6bbb10c312",
}

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3  # piece `<0xNN>` has id NN + 3
_HEADER = struct.Struct("<7i")
_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")


class Llama2cFileError(ValueError):
    """A llama2.c checkpoint or tokenizer file is missing, truncated, corrupted or in another format."""


@dataclass(frozen=True)
class Llama2cConfig:
    """The checkpoint header. `shared_classifier` is True when the classifier is the token embedding."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size


@dataclass(frozen=True)
class Llama2cCheckpoint:
    """A parsed checkpoint. Weights are float32, as llama2.c stores them, [out_features, in_features]:

    - tok_embeddings: [vocab, dim]
    - attention_norm: [layers, dim]
    - wq: [layers, dim, dim]            (output rows are head-major: row h * head_size + j)
    - wk, wv: [layers, kv_dim, dim]     (kv_dim = n_kv_heads * head_size)
    - wo: [layers, dim, dim]
    - ffn_norm: [layers, dim]
    - w1, w3: [layers, hidden, dim]     (the MLP is w2(silu(w1 x) * w3 x))
    - w2: [layers, dim, hidden]
    - norm: [dim]
    - output: [vocab, dim]              (the same tensor as tok_embeddings when shared_classifier)
    """

    config: Llama2cConfig
    weights: dict[str, torch.Tensor]


@dataclass(frozen=True)
class Llama2cTokenizerData:
    """The parsed tokenizer file: `pieces[i]` (raw bytes) and `scores[i]` of token id i."""

    max_token_length: int
    pieces: tuple[bytes, ...]
    scores: tuple[float, ...]


# ----------------------------------------------------------------------------------------------------
# Files


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str, data: bytes | None = None) -> None:
    """Raise `Llama2cFileError` unless the file's sha256 (of `data` when already read) is `expected`."""
    actual = hashlib.sha256(data).hexdigest() if data is not None else sha256_file(path)
    if actual != expected.lower():
        raise Llama2cFileError(
            f"{path} has sha256 {actual}, expected {expected}: the file is corrupted or a different version. "
            "Delete it and download it again (Hugging Face hub repo karpathy/tinyllamas), or point "
            "WEIGHTSCOPE_MODELS at a folder holding an intact copy."
        )


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise Llama2cFileError(f"{path} does not exist. Check the path, or set WEIGHTSCOPE_MODELS.")
    return path.read_bytes()


def _checkpoint_layout(cfg: Llama2cConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the tensors in file order (including the two unused rotary tables)."""
    L, d, h, kv, V = cfg.n_layers, cfg.dim, cfg.hidden_dim, cfg.kv_dim, cfg.vocab_size
    layout = [
        ("tok_embeddings", (V, d)),
        ("attention_norm", (L, d)),
        ("wq", (L, d, d)),
        ("wk", (L, kv, d)),
        ("wv", (L, kv, d)),
        ("wo", (L, d, d)),
        ("ffn_norm", (L, d)),
        ("w1", (L, h, d)),
        ("w2", (L, d, h)),
        ("w3", (L, h, d)),
        ("norm", (d,)),
        ("freq_cis_real", (cfg.seq_len, cfg.head_size // 2)),
        ("freq_cis_imag", (cfg.seq_len, cfg.head_size // 2)),
    ]
    if not cfg.shared_classifier:
        layout.append(("output", (V, d)))
    return layout


def _parse_header(data: bytes, path: Path) -> Llama2cConfig:
    if len(data) < _HEADER.size:
        raise Llama2cFileError(
            f"{path} is {len(data)} bytes, shorter than the 28-byte llama2.c header: the file is truncated. "
            "Download it again."
        )
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = _HEADER.unpack_from(data, 0)
    shared = vocab > 0  # a negative vocab size means the file ends with a separate classifier
    cfg = Llama2cConfig(dim, hidden, layers, heads, kv_heads, abs(vocab), seq_len, shared_classifier=shared)
    sane = (
        min(dim, hidden, layers, heads, kv_heads, cfg.vocab_size, seq_len) > 0
        and dim % heads == 0
        and heads % kv_heads == 0
        and cfg.head_size % 2 == 0
    )
    if not sane:
        raise Llama2cFileError(
            f"{path} does not start with a valid llama2.c legacy header (got dim={dim}, hidden={hidden}, "
            f"layers={layers}, heads={heads}, kv_heads={kv_heads}, vocab={vocab}, seq_len={seq_len}). "
            "Is it a llama2.c `.bin` checkpoint in the legacy (version 0) format?"
        )
    return cfg


def read_checkpoint(path: str | Path, expected_sha256: str | None = None) -> Llama2cCheckpoint:
    """Parse a llama2.c legacy checkpoint into float32 tensors (see `Llama2cCheckpoint` for names and shapes).

    Raises `Llama2cFileError` if the file is missing, its size differs from what its header implies, its
    sha256 differs from `expected_sha256` (when given), or a weight is NaN/Inf.
    """
    path = Path(path)
    data = _read_bytes(path)
    cfg = _parse_header(data, path)
    layout = _checkpoint_layout(cfg)
    n_floats = sum(math.prod(shape) for _, shape in layout)
    expected_size = _HEADER.size + 4 * n_floats
    if len(data) != expected_size:
        state = "truncated" if len(data) < expected_size else "longer than expected (trailing data)"
        raise Llama2cFileError(
            f"{path} is {len(data):,} bytes but its header ({cfg}) implies {expected_size:,} bytes: "
            f"the file is {state}. Delete it and download it again."
        )
    if expected_sha256 is not None:
        verify_sha256(path, expected_sha256, data)
    flat = np.frombuffer(data, dtype="<f4", offset=_HEADER.size, count=n_floats)
    weights: dict[str, torch.Tensor] = {}
    start = 0
    for name, shape in layout:
        size = math.prod(shape)
        weights[name] = torch.from_numpy(flat[start : start + size].astype(np.float32).reshape(shape))
        start += size
    del weights["freq_cis_real"], weights["freq_cis_imag"]  # run.c ignores them; rotary is recomputed
    if cfg.shared_classifier:
        weights["output"] = weights["tok_embeddings"]
    _check_finite(weights, path)
    return Llama2cCheckpoint(cfg, weights)


def _check_finite(weights: dict[str, torch.Tensor], path: Path) -> None:
    bad = [name for name, tensor in weights.items() if not torch.isfinite(tensor).all()]
    if bad:
        raise Llama2cFileError(
            f"{path} holds NaN or Inf values in {', '.join(bad)}: the checkpoint is corrupted. "
            "Delete it and download it again."
        )


def read_tokenizer(
    path: str | Path, vocab_size: int | None = None, expected_sha256: str | None = None
) -> Llama2cTokenizerData:
    """Parse a llama2.c tokenizer file (`tok512.bin`) into pieces and scores.

    The file holds no token count: it is read to its end, and must then hold exactly `vocab_size` tokens when
    that is given. Raises `Llama2cFileError` on a missing, truncated or corrupted file.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise _truncated_tokenizer(path, len(data))
    (max_token_length,) = struct.unpack_from("<i", data, 0)
    pieces: list[bytes] = []
    scores: list[float] = []
    offset = 4
    while offset < len(data) and (vocab_size is None or len(pieces) < vocab_size):
        if offset + 8 > len(data):
            raise _truncated_tokenizer(path, len(data))
        score, length = struct.unpack_from("<fi", data, offset)
        offset += 8
        if length < 0 or not math.isfinite(score):
            raise Llama2cFileError(
                f"{path}: token {len(pieces)} has length {length} and score {score}; the file is corrupted. "
                "Delete it and download it again."
            )
        if offset + length > len(data):
            raise _truncated_tokenizer(path, len(data))
        pieces.append(data[offset : offset + length])
        scores.append(score)
        offset += length
    if vocab_size is not None and (len(pieces) != vocab_size or offset != len(data)):
        raise Llama2cFileError(
            f"{path} holds {len(pieces)} tokens ({offset:,} of {len(data):,} bytes read) but the model "
            f"expects {vocab_size}: the tokenizer is truncated or belongs to another model. Use the "
            "tokenizer shipped with the checkpoint."
        )
    if expected_sha256 is not None:
        verify_sha256(path, expected_sha256, data)
    return Llama2cTokenizerData(max_token_length, tuple(pieces), tuple(scores))


def _truncated_tokenizer(path: Path, size: int) -> Llama2cFileError:
    return Llama2cFileError(
        f"{path} ends in the middle of a token record ({size:,} bytes): the tokenizer file is truncated. "
        "Delete it and download it again."
    )


# ----------------------------------------------------------------------------------------------------
# Encoder / decoder


class Llama2cEncoder:
    """Exact port of `run.c`'s `encode`/`decode` for a llama2.c vocabulary.

    Ids 0, 1, 2 are `<unk>`, BOS, EOS; piece `<0xNN>` (id NN + 3) is the byte fallback for byte NN.
    """

    def __init__(self, pieces: tuple[bytes, ...] | list[bytes], scores: tuple[float, ...] | list[float]):
        if len(pieces) != len(scores) or len(pieces) < BYTE_OFFSET + 256:
            raise ValueError(
                f"a llama2.c vocabulary needs 3 special tokens and 256 byte tokens, got {len(pieces)} pieces "
                f"and {len(scores)} scores"
            )
        self.pieces = tuple(pieces)
        self.scores = tuple(float(s) for s in scores)
        # run.c looks pieces up by string (bsearch); with duplicate pieces it could pick any of them.
        self.piece_to_id = {piece: i for i, piece in enumerate(self.pieces)}
        if len(self.piece_to_id) != len(self.pieces):
            raise ValueError("the vocabulary holds duplicate pieces; run.c's lookup would be ambiguous")
        self.space_id = self.piece_to_id.get(b" ")
        self.byte_values = self._byte_values()
        # Fast path: if no piece holds a space after its first byte, no merge can join anything onto a
        # following space, so text split before each space encodes chunk by chunk.
        self.fast_path_ok = self.space_id is not None and all(
            piece and b" " not in piece[1:] for piece in self.pieces
        )
        self._encode_chunk = functools.lru_cache(maxsize=1 << 18)(self._encode_chunk_uncached)

    @classmethod
    def from_file(cls, path: str | Path, vocab_size: int | None = None, expected_sha256: str | None = None):
        data = read_tokenizer(path, vocab_size=vocab_size, expected_sha256=expected_sha256)
        return cls(data.pieces, data.scores)

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def _byte_values(self) -> dict[int, int]:
        """Token id -> byte value for the byte-fallback pieces `<0xNN>`."""
        values = {}
        for i, piece in enumerate(self.pieces):
            match = _BYTE_PIECE.fullmatch(piece)
            if match:
                values[i] = int(match.group(1), 16)
        return values

    # encode ---------------------------------------------------------------------------------------

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text` exactly as run.c encodes it (dummy-prefix space added to non-empty text)."""
        if not self.fast_path_ok:
            return self.encode_slow(text, bos=bos, eos=eos)
        ids = [BOS_ID] if bos else []
        if text:
            for chunk in re.split(r"(?= )", " " + text):
                if chunk:
                    ids.extend(self._encode_chunk(chunk))
        if eos:
            ids.append(EOS_ID)
        return ids

    def encode_slow(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        """Reference path: merges over the whole text at once, as run.c does."""
        ids = [BOS_ID] if bos else []
        if text:
            ids.extend(self._merge(self._initial_ids(" " + text)))
        if eos:
            ids.append(EOS_ID)
        return ids

    def _encode_chunk_uncached(self, chunk: str) -> tuple[int, ...]:
        return tuple(self._merge(self._initial_ids(chunk)))

    def _initial_ids(self, text: str) -> list[int]:
        """One token per character, or its UTF-8 bytes as byte-fallback tokens when it has none."""
        ids: list[int] = []
        for char in text:
            encoded = char.encode("utf-8")
            token = self.piece_to_id.get(encoded)
            if token is not None:
                ids.append(token)
            else:
                ids.extend(byte + BYTE_OFFSET for byte in encoded)
        return ids

    def _pair(self, left: int, right: int) -> tuple[float, int]:
        """(score, id) of the piece left+right, or (-inf, -1) when it is not in the vocabulary."""
        token = self.piece_to_id.get(self.pieces[left] + self.pieces[right])
        return (-math.inf, -1) if token is None else (self.scores[token], token)

    def _merge(self, ids: list[int]) -> list[int]:
        """Repeatedly merge the best-scoring adjacent pair (leftmost on ties) until none merges."""
        pairs = [self._pair(a, b) for a, b in zip(ids, ids[1:])]
        while pairs:
            scores = [score for score, _ in pairs]
            best = max(scores)
            if best == -math.inf:
                break
            i = scores.index(best)  # leftmost maximum, as run.c's strict `>` scan picks
            ids[i : i + 2] = [pairs[i][1]]
            del pairs[i]
            if i > 0:
                pairs[i - 1] = self._pair(ids[i - 1], ids[i])
            if i < len(pairs):
                pairs[i] = self._pair(ids[i], ids[i + 1])
        return ids

    # decode ---------------------------------------------------------------------------------------

    def piece_bytes(self, token: int, prev_token: int | None = None) -> bytes:
        """Bytes of one token as run.c's `decode(prev, token)` gives them; special tokens give b""."""
        if token in (UNK_ID, BOS_ID, EOS_ID):
            return b""
        if token in self.byte_values:
            return bytes([self.byte_values[token]])
        piece = self.pieces[token]
        if prev_token == BOS_ID and piece.startswith(b" "):
            piece = piece[1:]  # the dummy-prefix space that encode added after BOS
        return piece

    def decode_bytes(self, ids) -> bytes:
        """Concatenated bytes of `ids` (ints), with run.c's after-BOS space stripping."""
        out = bytearray()
        prev = None
        for token in ids:
            token = int(token)
            out += self.piece_bytes(token, prev)
            prev = token
        return bytes(out)

    def decode(self, ids) -> str:
        """Text of `ids`; byte tokens that do not form valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def load_encoder(path: str | Path, vocab_size: int | None = None, expected_sha256: str | None = None):
    """`Llama2cEncoder` of a tokenizer file (see `read_tokenizer` for the checks)."""
    return Llama2cEncoder.from_file(path, vocab_size=vocab_size, expected_sha256=expected_sha256)


# ----------------------------------------------------------------------------------------------------
# The demo model, stories260K: where its two files are, and its tensors under TransformerLens's names

DEMO_MODEL = "stories260K"
HUB_REPO = "karpathy/tinyllamas"
CHECKPOINT_FILE, TOKENIZER_FILE = "stories260K.bin", "tok512.bin"


class ModelUnavailableError(FileNotFoundError):
    """The demo model's files are neither on disk nor downloadable."""


def stories260k_dir() -> Path:
    """Folder holding `stories260K.bin` and `tok512.bin`: `WEIGHTSCOPE_MODELS/stories260K`, else the download
    cache (downloading there from the hub if needed). Raises `ModelUnavailableError` when neither works."""
    candidates = []
    if paths.models_dir() is not None:
        candidates.append(paths.models_dir() / DEMO_MODEL)
    cache = paths.cache_dir() / "models" / DEMO_MODEL
    candidates.append(cache)
    for folder in candidates:
        if (folder / CHECKPOINT_FILE).is_file() and (folder / TOKENIZER_FILE).is_file():
            return folder
    try:
        for filename in (CHECKPOINT_FILE, TOKENIZER_FILE):
            hf_hub_download(HUB_REPO, f"{DEMO_MODEL}/{filename}", local_dir=cache.parent)
    except Exception as err:  # offline, hub unreachable, HF_HUB_OFFLINE=1, ...: all mean "not available"
        looked = ", ".join(str(folder) for folder in candidates)
        raise ModelUnavailableError(
            f"The {DEMO_MODEL} model files ({CHECKPOINT_FILE}, {TOKENIZER_FILE}) are not on disk (looked in "
            f"{looked}) and downloading them from the Hugging Face hub ({HUB_REPO}) failed: "
            f"{type(err).__name__}: {err}. Set WEIGHTSCOPE_MODELS to a folder containing {DEMO_MODEL}/, or "
            "connect to the internet."
        ) from err
    return cache


def llama2c_state_dict(ckpt: Llama2cCheckpoint, cfg) -> dict[str, torch.Tensor]:
    """HookedTransformer state dict (unprocessed) of a llama2.c checkpoint.

    Shapes: embed.W_E [d_vocab, d_model]; W_Q [n_heads, d_model, d_head]; _W_K, _W_V [n_kv_heads, d_model,
    d_head] (W_K, W_V without the underscore when there is no GQA); W_O [n_heads, d_head, d_model]; ln1.w,
    ln2.w, ln_final.w [d_model]; mlp.W_gate = w1^T and mlp.W_in = w3^T [d_model, d_mlp] (TransformerLens
    computes silu(x W_gate) * (x W_in)); mlp.W_out = w2^T [d_mlp, d_model]; unembed.W_U = W_E^T
    [d_model, d_vocab] when tied; all biases zero.
    """
    w = ckpt.weights
    n_heads, d_head, d_model = cfg.n_heads, cfg.d_head, cfg.d_model
    n_kv = cfg.n_key_value_heads or n_heads
    kv = "_" if cfg.n_key_value_heads else ""

    def heads_in(weight: torch.Tensor, n: int) -> torch.Tensor:
        """[n * d_head, d_model] (y = W x, head-major rows) -> [n, d_model, d_head]."""
        return weight.reshape(n, d_head, d_model).transpose(1, 2)

    sd = {"embed.W_E": w["tok_embeddings"], "ln_final.w": w["norm"]}
    sd["unembed.W_U"] = w["output"].T
    sd["unembed.b_U"] = torch.zeros(cfg.d_vocab_out)
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}."
        sd[p + "ln1.w"] = w["attention_norm"][layer]
        sd[p + "ln2.w"] = w["ffn_norm"][layer]
        sd[p + "attn.W_Q"] = heads_in(w["wq"][layer], n_heads)
        sd[p + f"attn.{kv}W_K"] = heads_in(w["wk"][layer], n_kv)
        sd[p + f"attn.{kv}W_V"] = heads_in(w["wv"][layer], n_kv)
        # wo: [d_model, n_heads * d_head] -> W_O [n_heads, d_head, d_model]
        sd[p + "attn.W_O"] = w["wo"][layer].T.reshape(n_heads, d_head, d_model)
        sd[p + "attn.b_Q"] = torch.zeros(n_heads, d_head)
        sd[p + f"attn.{kv}b_K"] = torch.zeros(n_kv, d_head)
        sd[p + f"attn.{kv}b_V"] = torch.zeros(n_kv, d_head)
        sd[p + "attn.b_O"] = torch.zeros(d_model)
        sd[p + "mlp.W_gate"] = w["w1"][layer].T
        sd[p + "mlp.W_in"] = w["w3"][layer].T
        sd[p + "mlp.W_out"] = w["w2"][layer].T
        sd[p + "mlp.b_in"] = torch.zeros(cfg.d_mlp)
        sd[p + "mlp.b_out"] = torch.zeros(d_model)
    return {name: tensor.contiguous().clone() for name, tensor in sd.items()}
