"""Chapter 0's sentences about the target, computed from its checkpoint so that they hold for any target.

Every function returns Markdown built from the weights-only model's config (`describe`) and the parameters:
nothing here is true of one target only.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from weightscope import io
from weightscope.compute.passes import final_logits
from weightscope.load.models import PAPER_MODELS, describe


def _n(x: int) -> str:
    return f"{x:,}"


@torch.no_grad()
def greedy_generate(model, prompt: str, n_tokens: int) -> torch.Tensor:
    """Greedy continuation: [1 + len(prompt tokens) + n_tokens] ids, BOS first (stops early at BOS/EOS).

    With a key-value cache (TransformerLens's): the prompt runs once, then one position per new token, so
    n tokens cost n positions' passes, not the n^2 / 2 of rerunning the whole sequence each time. Each step
    stops after the last block and unembeds only the last position (`final_logits`).
    """
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    # 6.8 s for 80 tokens at GPT-2 small's width on 2 CPUs: a line before it
    io.progress(f"00_demo_model: a greedy continuation of {n_tokens} tokens ...")
    ids = model.to_tokens(prompt)
    stop = {model.tokenizer.bos_token_id, model.tokenizer.eos_token_id}
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, 1)
    step = ids
    for _ in range(n_tokens):
        resid = model(step, past_kv_cache=cache, stop_at_layer=model.cfg.n_layers)  # [1, pos, d_model]
        next_id = final_logits(model, resid[0, -1:])[0].argmax()
        if int(next_id) in stop:
            break
        step = next_id.view(1, 1)
        ids = torch.cat([ids, step], dim=1)
    return ids[0]


def architecture_note(model) -> str:
    """How the target's architecture compares with the paper's two models (width, vocabulary, tying, norm)."""
    facts = describe(model)
    gemma, llama = PAPER_MODELS["Gemma-2-2B"], PAPER_MODELS["Llama-3.1-8B"]
    tied = facts["tied_embeddings"]
    like = "like Gemma-2 and unlike Llama-3.1-8B" if tied else "like Llama-3.1-8B and unlike Gemma-2"
    return (
        f"**{model.cfg.model_name}** ({model.cfg.original_architecture}, {facts['n_layers']} layers) has "
        f"{_n(facts['d_model'])} residual dimensions (Gemma-2-2B {_n(gemma['d_model'])}, Llama-3.1-8B "
        f"{_n(llama['d_model'])}) and a vocabulary of {_n(facts['d_vocab'])} tokens (Gemma-2 "
        f"{_n(gemma['d_vocab'])}, Llama-3.1 {_n(llama['d_vocab'])}). Its norm is {facts['normalization']}, "
        f"its attention has {facts['n_heads']} query heads sharing {facts['n_key_value_heads']} key/value "
        f"heads, and it {'ties' if tied else 'does not tie'} its unembedding to its embedding ({like}), so "
        f"chapter 1's two sides {'use the same token vectors' if tied else 'use different token vectors'}."
    )


def sae_source_note(target) -> str:
    """Where the target's SAEs come from, in words."""
    source = target.sae_source
    if source == "demo":
        return (
            "The SAEs were trained by this project with sae-lens's own training code, one per layer on the "
            "residual stream after each block (`blocks.L.hook_resid_post`, the site of the Gemma Scope and "
            "Llama Scope residual SAEs). Their metrics below are measured on held-out stories: *explained "
            "variance* is "
            "$1 - \\sum\\lVert x - \\hat x\\rVert^2 / \\sum \\lVert x - \\bar x\\rVert^2$ over held-out "
            "residual vectors $x$, *L0* is the mean number of active features per token, and *dead* is the "
            "share of features that never fire on the held-out text."
        )
    if Path(source).expanduser().exists():
        return (f"The SAEs are read from the local folder `{source}` (sae-lens's saved format); their "
                "training metrics, if any, are those recorded in its files.")
    return (f"The SAEs are the public sae-lens release `{source}`; their training metrics are documented by "
            "their authors.")


def scale_caveats(model, demo: bool) -> str:
    """What the target's scale lets the book show, from its width, vocabulary and depth."""
    facts = describe(model)
    lines = [f"- **Width.** {_n(facts['d_model'])} residual dimensions: the narrower the stream, the less "
             "orthogonal random directions are, and the more the null baselines of the next chapters matter.",
             f"- **Vocabulary.** {_n(facts['d_vocab'])} tokens: the lens ranks every one of them for every "
             "feature.",
             f"- **Depth.** {facts['n_layers']} layers give {facts['n_layers']} points on every depth curve."]
    if demo:
        lines.append("- **A real pretrained model.** The demo's weights come from training, so its weight "
                     "products are those of a working model, and every number can be recomputed in minutes "
                     "on a laptop.")
    return "\n".join(lines)


def sae_metrics_caption(target) -> str:
    """The caption of the demo SAEs' metrics figure (empty for other targets, which have no such figure)."""
    if target.sae_source != "demo":
        return ""
    return ("*The dotted lines mark the quality bar this project set for the demo SAEs: explained variance "
            "at least 0.8, at most 32 active features per token, at most 20% dead features.*")


# --- the demo SAEs' training metrics (chapter 0's figure) ---

QUALITY_BAR = {"explained_variance": 0.8, "mean_l0": 32, "dead_fraction": 0.2}  # the caption's bar
_METRIC_COLUMNS = ["layer", "explained_variance", "mean_l0", "dead_fraction", "mse", "tokens_seen",
                   "training_time_s"]
_AXIS_TITLES = {"explained_variance": "fraction of variance", "mean_l0": "active features per token",
                "dead_fraction": "fraction of features"}


def sae_metrics(manifest: dict) -> tuple[str, pd.DataFrame]:
    """(one line on what the demo SAEs were trained and evaluated on, one row of metrics per layer) from the
    demo SAEs' manifest."""
    metrics = pd.DataFrame(manifest["per_layer"].values())[_METRIC_COLUMNS]
    line = (f"trained on {manifest['distinct_training_tokens']:,} distinct tokens "
            f"({manifest['epochs_over_distinct_tokens']} passes); evaluated on "
            f"{manifest['n_eval_tokens']:,} held-out tokens of {manifest['n_eval_stories']} stories")
    return line, metrics


def sae_metrics_figure(metrics: pd.DataFrame) -> go.Figure:
    """Explained variance, mean L0 and dead fraction per layer, each beside its quality bar (dotted)."""
    fig = make_subplots(rows=1, cols=3, subplot_titles=("explained variance", "mean L0", "dead fraction"))
    for col, (key, bar) in enumerate(QUALITY_BAR.items(), 1):
        fig.add_trace(go.Bar(x=metrics["layer"], y=metrics[key], name=key,
                             hovertemplate="layer %{x}<br>" + key + " %{y:.3f}<extra></extra>"),
                      row=1, col=col)
        fig.add_hline(y=bar, line_dash="dot", annotation_text=f"bar {bar}", row=1, col=col)
        fig.update_xaxes(title_text="layer", dtick=1, row=1, col=col)
        fig.update_yaxes(title_text=_AXIS_TITLES[key], row=1, col=col)
    fig.update_layout(showlegend=False, height=340, title="Demo SAEs on held-out text")
    return fig
