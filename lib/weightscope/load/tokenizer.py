"""A Hugging Face tokenizer around the llama2.c encoder, so TransformerLens can tokenize for llama2.c models.

Conventions (chosen so that `HookedTransformer.to_tokens` / `to_string` / `to_str_tokens` / `generate`
behave as for the sentencepiece Llama tokenizer, and reproduce `run.c` ids exactly):

- The tokenizer itself prepends BOS (`add_bos_token=True`, like `LlamaTokenizer`). TransformerLens then sees
  `tokenizer_prepends_bos=True`: it leaves BOS to the tokenizer and strips it for `prepend_bos=False`, and
  does not try to reload the tokenizer from the hub with `add_bos_token=True` (`get_tokenizer_with_bos`).
- Special tokens have the strings `<unk>` (0), `<s>` (1, BOS) and `</s>` (2, EOS); the file stores BOS/EOS
  as "\\n<s>\\n" / "\\n</s>\\n", renamed here so that Hugging Face's special-token splitting works: a literal
  `<s>` in the text becomes BOS, as with other Hugging Face tokenizers (run.c itself would spell it out).
- Padding uses `</s>` (EOS, id 2): the model never sees it inside a story, and TransformerLens masks pads from
  the attention mask. Padding is on the right unless asked otherwise.
- Every non-empty text gets the sentencepiece dummy-prefix space, as in run.c. Decoding follows run.c: a piece
  right after BOS loses its leading space, so `decode([1, 403])` is "<s>Once" and `decode([403])` " Once";
  `skip_special_tokens=True` drops the special tokens' strings but keeps that rule.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers import PreTrainedTokenizer

from weightscope.load.checkpoints import CheckpointError
from weightscope.load.llama2c import (BOS_ID, EOS_ID, KNOWN_SHA256, TOKENIZER_FILE, UNK_ID, Llama2cEncoder,
                                      read_tokenizer, stories260k_dir)

SPECIAL_NAMES = {UNK_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>"}


class Llama2cTokenizer(PreTrainedTokenizer):
    """`transformers` tokenizer for a llama2.c `tok*.bin` vocabulary (exact `run.c` encoding and decoding)."""

    vocab_files_names = {"vocab_file": "tok512.bin"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | Path,
        *,
        vocab_size: int | None = None,
        expected_sha256: str | None = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        **kwargs,
    ):
        data = read_tokenizer(vocab_file, vocab_size=vocab_size, expected_sha256=expected_sha256)
        self.vocab_file = str(vocab_file)
        self.encoder = Llama2cEncoder(data.pieces, data.scores)
        # Token strings: special tokens renamed, other pieces as UTF-8 text (byte pieces are ASCII `<0xNN>`).
        self._id_to_token = [
            SPECIAL_NAMES.get(i, piece.decode("utf-8", errors="backslashreplace"))
            for i, piece in enumerate(data.pieces)
        ]
        self._token_to_id = {token: i for i, token in enumerate(self._id_to_token)}
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        kwargs.setdefault("name_or_path", str(Path(vocab_file).parent))  # TransformerLens pops this key
        kwargs.setdefault("padding_side", "right")
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        # Special tokens are fixed by the vocabulary (from_pretrained passes saved ones back); pad may vary.
        for name in ("unk_token", "bos_token", "eos_token"):
            kwargs.pop(name, None)
        kwargs.setdefault("pad_token", SPECIAL_NAMES[EOS_ID])
        super().__init__(
            unk_token=SPECIAL_NAMES[UNK_ID],
            bos_token=SPECIAL_NAMES[BOS_ID],
            eos_token=SPECIAL_NAMES[EOS_ID],
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            **kwargs,
        )

    # vocabulary -----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._token_to_id)

    def _convert_token_to_id(self, token: str) -> int:
        return self._token_to_id.get(token, UNK_ID)

    def _convert_id_to_token(self, index: int) -> str:
        return self._id_to_token[index]

    # encoding -------------------------------------------------------------------------------------

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        """Pieces of `text` (no BOS/EOS; dummy-prefix space included when non-empty)."""
        return [self._id_to_token[i] for i in self.encoder.encode(text, bos=False)]

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None):
        """[BOS] ids [EOS], BOS/EOS per `add_bos_token` / `add_eos_token`; pairs are concatenated likewise."""
        bos = [BOS_ID] if self.add_bos_token else []
        eos = [EOS_ID] if self.add_eos_token else []
        out = bos + token_ids_0 + eos
        return out if token_ids_1 is None else out + bos + token_ids_1 + eos

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            special = set(SPECIAL_NAMES)
            return [int(i in special) for i in token_ids_0 + (token_ids_1 or [])]
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        return mask if token_ids_1 is None else mask + bos + [0] * len(token_ids_1) + eos

    def create_token_type_ids_from_sequences(self, token_ids_0, token_ids_1=None):
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    # decoding -------------------------------------------------------------------------------------

    def _decode(
        self,
        token_ids,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs,
    ) -> str:
        """run.c decoding on ids; special tokens appear as `<s>` etc. unless skipped."""
        ids = [int(token_ids)] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        out = bytearray()
        prev = None
        for token in ids:
            if token in SPECIAL_NAMES:
                if not skip_special_tokens:
                    out += SPECIAL_NAMES[token].encode()
            elif token in self._added_tokens_decoder:  # tokens added after construction
                out += self._added_tokens_decoder[token].content.encode()
            else:
                out += self.encoder.piece_bytes(token, prev)
            prev = token
        return out.decode("utf-8", errors="replace")

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._decode([self._convert_token_to_id_with_added_voc(t) for t in tokens])

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        """Copy the llama2.c tokenizer file, so `save_pretrained` / `from_pretrained` round-trip."""
        name = (f"{filename_prefix}-" if filename_prefix else "") + self.vocab_files_names["vocab_file"]
        target = Path(save_directory) / name
        if Path(self.vocab_file).resolve() != target.resolve():
            shutil.copyfile(self.vocab_file, target)
        return (str(target),)


def stories260k_tokenizer(folder: Path | None = None, model_max_length: int = 512) -> Llama2cTokenizer:
    """The demo model's tokenizer (sha256-checked)."""
    folder = folder or stories260k_dir()
    return Llama2cTokenizer(
        folder / TOKENIZER_FILE,
        vocab_size=512,
        expected_sha256=KNOWN_SHA256[TOKENIZER_FILE],
        model_max_length=model_max_length,
    )


def hf_tokenizer(folder: Path):
    """The Hugging Face tokenizer saved in a model folder; a clear error when its files are missing."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:
        raise CheckpointError(
            f"Cannot load the tokenizer of {folder}: {type(err).__name__}: {err}. The folder needs its "
            "tokenizer files (tokenizer.json or vocab.json + merges.txt, tokenizer_config.json); save them "
            "with `tokenizer.save_pretrained(folder)`."
        ) from err
