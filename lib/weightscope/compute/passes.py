"""One forward pass, run a stretch of blocks at a time.

A chapter that reads hooks of several blocks in turn (chapter 4 one layer after another, chapter 6 one
dictionary after another) keeps the residual stream where the last stretch left it and starts the next
stretch there, so every block runs once, as in a single pass, instead of once per layer read (a pass up to
each of 12 layers runs 78 blocks; in stretches, 12). Each stretch is TransformerLens's own
`run_with_cache(residual, start_at_layer=, stop_at_layer=)`, so its hooks hold what a whole pass's would.

    stream = BlockStream(model, tokens)        # tokens [b, pos]: the model's work before block 0
    cache = stream.run_to(3, ["blocks.3.attn.hook_z"])   # blocks 0..3; then run_to(5, ...) runs 4..5

`final_logits` finishes a pass from the last block's output: the logits of the positions wanted, only those.
"""

from __future__ import annotations

import torch


class BlockStream:
    """The residual stream of one batch of token rows between stretches of blocks (with its positional
    embedding and attention mask, which every stretch needs again)."""

    def __init__(self, model, tokens: torch.Tensor):
        """tokens: [b, pos]."""
        self.model = model
        self.residual, self.tokens, self._pos_embed, self._mask = model.input_to_embed(tokens)
        self.next_block = 0

    @torch.no_grad()
    def run_to(self, last: int, hooks: list[str]):
        """Runs blocks next_block..last and returns their ActivationCache of `hooks` (which must name hooks of
        those blocks); the residual stream then stands after block last. A block that has run cannot be read
        again: ValueError."""
        if last < self.next_block:
            raise ValueError(f"block {last} has already run (the stream stands before block "
                             f"{self.next_block}); read blocks in increasing order or start a new stream")
        self.residual, cache = self.model.run_with_cache(
            self.residual, start_at_layer=self.next_block, stop_at_layer=last + 1, names_filter=hooks,
            shortformer_pos_embed=self._pos_embed, attention_mask=self._mask)
        self.next_block = last + 1
        return cache


def final_logits(model, x: torch.Tensor) -> torch.Tensor:
    """fp32 [m, d_vocab]: logits from final residuals x [m, d_model] (the last block's `hook_resid_post`), as
    the forward pass computes them: final norm, unembedding x @ W_U + b_U, soft cap.

    Not through `model.unembed`: TransformerLens's `Unembed` copies W_U's transpose on every call (to match
    Hugging Face's bf16 accumulation order), 154 MB at GPT-2 small and 2.4 GB at Gemma-2's vocabulary in
    fp32, which cost more than the product itself for a few positions (greedy generation: one per token)."""
    from transformer_lens.utilities.activation_functions import apply_softcap

    x = x[:, None]  # [m, 1, d_model]: the norm takes a position axis
    if model.cfg.normalization_type is not None:
        x = model.ln_final(x)
    logits = x[:, 0] @ model.unembed.W_U + model.unembed.b_U
    return apply_softcap(logits, model.cfg.output_logits_soft_cap).float()
