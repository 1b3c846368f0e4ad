"""Chapter 2's reads summary: `attention.reads_summary` (grouped by one integer code per (layer, read_layer,
head), `attention.group_code`) against the same aggregation grouped by the three columns, on a reads table of
GPT-2 small's shape (24,576 features, 12 heads; every SAE layer read by itself and each later layer: 23M rows
at 12 layers, the table of section 21's runs), with random values. The two summaries must be equal."""

from __future__ import annotations

import harness

NAME = "reads_summary"
ORDER = 6
SHAPE = {"n_features": 24576, "n_heads": 12}  # GPT-2 small's SAEs and heads
# SAE layers in the table (each read by itself and every later layer); on a GPU machine too this is pandas on
# its CPU
PLANS = {(device, quick): {"layers": 3 if quick else 12} for device in ("cpu", "cuda")
         for quick in (False, True)}


def reads_table(layers: int, n: int, n_heads: int):
    """A `sae_attention_reads`-shaped frame: rows per (layer, read_layer >= layer, feature, head)."""
    import numpy as np
    import pandas as pd

    pairs = [(a, b) for a in range(layers) for b in range(a, layers)]
    size, rng = len(pairs) * n * n_heads, np.random.default_rng(0)
    cols = {"feature": np.tile(np.repeat(np.arange(n, dtype=np.int32), n_heads), len(pairs)),
            "layer": np.repeat(np.array([a for a, _ in pairs], np.int16), n * n_heads),
            "read_layer": np.repeat(np.array([b for _, b in pairs], np.int16), n * n_heads),
            "head": np.tile(np.arange(n_heads, dtype=np.int16), n * len(pairs))}
    cols["kv_head"], cols["distance"] = cols["head"], (cols["read_layer"] - cols["layer"]).astype(np.int16)
    for name in "qkv":
        for suffix in ("", "_cov"):
            cols[f"{name}_z{suffix}"] = rng.standard_normal(size, dtype=np.float32)
            cols[f"{name}_part{suffix}"] = cols[f"{name}_z{suffix}"] > 1.5
    return pd.DataFrame(cols, copy=False)


def three_key_summary(df):
    """The aggregation of `reads_summary`, grouped by the three key columns (the route it replaced)."""
    grouped = (df.assign(any_part=df["q_part"] | df["k_part"] | df["v_part"])
               .groupby(["layer", "read_layer", "head"], sort=True))
    cov = {f"{n}_frac_cov": (f"{n}_part_cov", "mean") for n in "qkv"}
    return grouped.agg(**cov, kv_head=("kv_head", "first"), distance=("distance", "first"),
                       n_features=("feature", "size"), q_frac=("q_part", "mean"), k_frac=("k_part", "mean"),
                       v_frac=("v_part", "mean"), any_frac=("any_part", "mean"),
                       q_z_median=("q_z", "median"), k_z_median=("k_z", "median"),
                       v_z_median=("v_z", "median")).reset_index()


def run(ctx: harness.Context) -> list[dict]:
    import pandas as pd

    from weightscope.compute.attention import reads_summary

    layers, n, h = ctx.plan["layers"], SHAPE["n_features"], SHAPE["n_heads"]
    df = reads_table(layers, n, h)
    harness.log(f"reads_summary: {len(df):,} rows ({layers} SAE layers x {n:,} features x {h} heads)")
    routes = {"three_keys": lambda: three_key_summary(df), "group_code": lambda: reads_summary(df)}
    timed = harness.time_interleaved(routes, repeats=ctx.repeats, device="cpu")
    a, b = routes["three_keys"](), routes["group_code"]()
    pd.testing.assert_frame_equal(a, b[a.columns])
    return [{**ctx.meta, "benchmark": NAME, "layers": layers, "rows": len(df), **SHAPE, **timed,
             "equal": True, "ratio": timed["three_keys"]["median_s"] / timed["group_code"]["median_s"]}]


def table(rows: list[dict], report: dict) -> str:
    lines = ["| SAE layers | rows | three key columns | one integer code | ratio | equal |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        same = "yes" if r["equal"] else "no"
        lines.append(f"| {r['layers']} | {r['rows']:,} | {harness.ms(r['three_keys'])} "
                     f"| {harness.ms(r['group_code'])} | {r['ratio']:.1f} | {same} |")
    return "\n".join(lines) + "\n"
