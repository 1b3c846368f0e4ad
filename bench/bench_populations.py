"""Chapter 3's bootstrap intervals: `populations.bootstrap_ci` (scipy.stats.bootstrap over resampled indices,
statistics from draw counts) against the plain route, one explicit resample at a time, for the difference of
means and Cliff's delta, at the demo's population sizes and at a Gemma-2-2B suite's (16,384 features x 26
layers, split as the demo's labels split them)."""

from __future__ import annotations

import harness

NAME = "populations"
ORDER = 6
# (semantic, non-semantic) population sizes: the demo's decoder side (83, 1,948 of 2,560 features read by a
# later layer), and the same shares of a Gemma-2-2B suite's 425,984 features
SIZES = {"demo": (83, 1948), "gemma-2-2b": (13_810, 324_130)}
# Resamples per shape of the library route and of the plain route (fewer: it is the slow one); the ratio is
# per resample. On a GPU machine too the statistics run on its CPU.
_FULL = {"n_boot": {"demo": 2000, "gemma-2-2b": 100}, "n_boot_plain": {"demo": 50, "gemma-2-2b": 5}}
_QUICK = {"n_boot": {"demo": 200, "gemma-2-2b": 20}, "n_boot_plain": {"demo": 10, "gemma-2-2b": 2}}
PLANS = {(device, quick): _QUICK if quick else _FULL for device in ("cpu", "cuda") for quick in (False, True)}


def plain_bootstrap(x, y, stat: str, n_boot: int, seed: int):
    """Percentile interval from explicit resamples: draw, compute the statistic, repeat."""
    import numpy as np

    from weightscope.compute.populations import cliffs_delta

    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        xr, yr = rng.choice(x, len(x)), rng.choice(y, len(y))
        values.append(xr.mean() - yr.mean() if stat == "mean_diff" else cliffs_delta(xr, yr))
    return np.quantile(values, [0.025, 0.975])


def run(ctx: harness.Context) -> dict:
    import numpy as np

    from weightscope.compute.populations import bootstrap_ci

    rows = []
    for shape, (n_a, n_b) in SIZES.items():
        rng = np.random.default_rng(0)
        x, y = rng.normal(0.2, 1.0, n_a), rng.normal(0.0, 1.0, n_b)
        for stat in ("mean_diff", "cliffs_delta"):
            harness.log(f"populations: {shape} ({n_a:,} vs {n_b:,}), {stat}")
            n_boot, n_plain = ctx.plan["n_boot"][shape], ctx.plan["n_boot_plain"][shape]
            library = harness.time_runs(lambda: bootstrap_ci(x, y, stat, n_boot=n_boot, seed=1),
                                        repeats=ctx.repeats, device="cpu", warmup=0)
            plain = harness.time_runs(lambda: plain_bootstrap(x, y, stat, n_plain, seed=1),
                                      repeats=ctx.repeats, device="cpu", warmup=0)
            per_lib, per_plain = library["median_s"] / n_boot, plain["median_s"] / n_plain
            rows.append({**ctx.meta, "benchmark": "populations", "shape": shape, "n_a": n_a, "n_b": n_b,
                         "stat": stat, "n_boot": n_boot, "n_boot_plain": n_plain, "library": library,
                         "plain": plain, "library_s_per_resample": per_lib, "plain_s_per_resample": per_plain,
                         "ratio_plain_over_library_per_resample": per_plain / per_lib})
            ratio = rows[-1]["ratio_plain_over_library_per_resample"]
            harness.log(f"  plain / library per resample = {ratio:.1f}")
    return rows


def table(rows: list[dict], report: dict) -> str:
    lines = ["| populations (semantic vs non-semantic) | statistic | library, n_boot resamples "
             "| per resample | plain route, per resample | ratio |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} ({r['n_a']:,} vs {r['n_b']:,}) | {r['stat']} "
                     f"| {r['library']['median_s']:.2f} s for {r['n_boot']:,} "
                     f"| {r['library_s_per_resample'] * 1e3:.2f} ms "
                     f"| {r['plain_s_per_resample'] * 1e3:.2f} ms "
                     f"| {r['ratio_plain_over_library_per_resample']:.1f} |")
    return "\n".join(lines) + "\n"
