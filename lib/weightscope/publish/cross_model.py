"""The cross-model page's tables: every atlas row and every built target, each rate beside its null and the
paper's number, and what is missing.

    summary = cross_model.atlas_summary()               # the atlas's summary.csv (empty frame when none)
    depth = cross_model.rate_by_depth(summary)          # model, relative depth, side, rate, null, interval
    built = cross_model.built_targets()                 # targets with a chapter 1 table, and their rates
    sentences = cross_model.findings(summary, built)
"""

from __future__ import annotations

import pandas as pd

from weightscope import io
from weightscope.config.paths import data_dir
from weightscope.publish import atlas

SIDES = {"decoder-unembedding": "output (decoder-unembedding)",
         "encoder-embedding": "input (encoder-embedding)"}
PAPER_RATE = 0.25  # Liu & Deng (arXiv 2601.22447): "about one quarter" of features predict output tokens
PAPER_MODELS = ("gemma-2-2b", "gemma-2-9b", "meta-llama/Llama-3.1-8B")  # the models the paper reports on


def atlas_summary() -> pd.DataFrame:
    """The atlas's summary table (one row per SAE), or an empty frame when the atlas has not run."""
    path = atlas.atlas_dir() / "summary.csv"
    return pd.read_csv(path) if path.is_file() else pd.DataFrame()


def rate_by_depth(summary: pd.DataFrame) -> pd.DataFrame:
    """Measured SAEs in long form: model, release, sae_id, layer, depth (layer over the model's deepest
    measured layer), width, side, rate, lo, hi, null (random directions), paper (the paper's rate, output
    side only)."""
    cols = ["model", "release", "sae_id", "layer", "depth", "width", "side", "rate", "lo", "hi", "null",
            "paper"]
    if summary.empty or "status" not in summary:
        return pd.DataFrame(columns=cols)
    done = summary[summary["status"] == "done"].copy()
    done["depth"] = done["layer"] / done.groupby("model")["layer"].transform("max").clip(lower=1)
    parts = []
    for side, name in SIDES.items():
        part = done[["model", "release", "sae_id", "layer", "depth", "width"]].assign(side=name)
        for col in ("rate", "lo", "hi"):
            part[col] = done[f"{side}_{col}"]
        part["null"] = done[f"{side}_null_random"]
        part["paper"] = PAPER_RATE if side == "decoder-unembedding" else float("nan")
        parts.append(part)
    return pd.concat(parts, ignore_index=True)[cols]


def attention_by_depth(summary: pd.DataFrame) -> pd.DataFrame:
    """Attention participation per SAE and side against both nulls and chance: model, depth, side, null, rate,
    chance."""
    if summary.empty or "status" not in summary:
        return pd.DataFrame(columns=["model", "sae_id", "depth", "side", "null", "rate", "chance"])
    done = summary[summary["status"] == "done"].copy()
    done["depth"] = done["layer"] / done.groupby("model")["layer"].transform("max").clip(lower=1)
    rows = []
    for r in done.itertuples(index=False):
        for side in ("query", "key", "value"):
            for null, suffix in (("isotropic", "iso"), ("decoder covariance", "cov")):
                rows.append({"model": r.model, "sae_id": r.sae_id, "depth": r.depth, "side": side,
                             "null": null,
                             "rate": getattr(r, f"attn_{side}_{suffix}"), "chance": r.attn_chance})
    return pd.DataFrame(rows)


def built_targets() -> pd.DataFrame:
    """Every target with a chapter 1 table: target, layers, features, and the share passing the rule per side
    (the null of a built target is on its own chapter 1 page; its atlas rows carry it here)."""
    rows = []
    root = data_dir() / "results"
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        if folder.name == atlas.TARGET or io.table_problem(folder.name, "01_features") is not None:
            continue
        f = io.load_table(folder.name, "01_features",  # the rates' columns alone: the list columns are most of it
                          columns=["layer", *(f"{s[:3]}_predicts" for s in _CH1_SIDES)])
        if f is None or f.empty:
            continue
        rows.append({"target": folder.name, "layers": int(f["layer"].nunique()), "features": len(f),
                     **{name: float(f[f"{s[:3]}_predicts"].mean()) for s, name in _CH1_SIDES.items()}})
    return pd.DataFrame(rows, columns=["target", "layers", "features", *_CH1_SIDES.values()])


_CH1_SIDES = {"decoder": "output rate", "encoder": "input rate"}


def missing(summary: pd.DataFrame, built: pd.DataFrame) -> list[str]:
    """What the page cannot show yet, as sentences."""
    out = []
    measured = set(summary.loc[summary["status"] == "done", "model"]) if "status" in summary else set()
    absent = [m for m in PAPER_MODELS if m not in measured]
    if absent:
        out.append(f"No atlas rows yet for the paper's models ({', '.join(absent)}): run `make atlas` where "
                   "they can be downloaded.")
    if summary.empty:
        out.append("The atlas has not run on this machine (no summary table).")
    if built.empty:
        out.append("No target has been built (no chapter 1 table).")
    return out


def findings(summary: pd.DataFrame, built: pd.DataFrame) -> list[str]:
    """The page's result sentences, computed from the tables."""
    out = []
    depth = rate_by_depth(summary)
    if len(summary):
        counts = summary["status"].value_counts().to_dict()
        out.append(f"The atlas holds {len(summary)} SAEs over {summary['model'].nunique()} models "
                   f"({', '.join(f'{n} {s}' for s, n in counts.items())}).")
    for (model, side), g in depth.groupby(["model", "side"]):
        above = int((g["lo"] > g["null"]).sum())
        below_paper = "" if g["paper"].isna().all() else (
            f"; the paper reports about {PAPER_RATE:.0%}, which {int((g['hi'] < PAPER_RATE).sum())} of them "
            "lie entirely below and " f"{int((g['lo'] > PAPER_RATE).sum())} entirely above")
        out.append(f"{model}, {side} side: the rate ranges {g['rate'].min():.1%}–{g['rate'].max():.1%} over "
                   f"{len(g)} SAEs (null {g['null'].min():.1%}–{g['null'].max():.1%}); {above} of {len(g)} "
                   f"have their 95% interval above the null{below_paper}.")
    return out + missing(summary, built)


def depth_figure(depth: pd.DataFrame):
    """Predicting rate per SAE against relative depth, one panel per side, with 95% intervals, each SAE's null
    as a cross and the paper's rate as a dotted line. depth: `rate_by_depth`'s table."""
    import plotly.express as px

    fig = px.scatter(depth, x="depth", y="rate", color="model", facet_col="side",
                     error_y=depth["hi"] - depth["rate"], error_y_minus=depth["rate"] - depth["lo"],
                     hover_data=["release", "sae_id", "width", "null"],
                     labels={"depth": "layer / deepest layer measured", "rate": "share passing the rule"},
                     title="Predicting rate per SAE (bars: 95% interval), null as crosses")
    for i, side in enumerate(depth["side"].unique(), 1):
        d = depth[depth["side"] == side]
        fig.add_scatter(x=d["depth"], y=d["null"], mode="markers", marker_symbol="x",
                        name=f"null ({side.split()[0]})", row=1, col=i)
    fig.add_hline(y=PAPER_RATE, line_dash="dot", annotation_text="paper: about 1/4")
    return fig
