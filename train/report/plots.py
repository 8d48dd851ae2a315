"""The report's figures (matplotlib, Agg backend): one function per figure, each writes one PNG."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters or in tests
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from emformer.train.report.checks import (  # noqa: E402
    RATE_SLOPE, AxisTrend, PassesAgainstEm, Point, SampleComplexity, SeparationTrend, label, varying_keys,
)
from emformer.train.report.records import SHORT_NAMES  # noqa: E402

plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.grid": True, "grid.alpha": 0.3,
                     "legend.fontsize": 8, "figure.dpi": 110})
BASELINE_STYLE = {"em": ("EM", "tab:red", "--"), "lloyd": ("Lloyd", "tab:purple", "-."),
                  "oracle": ("oracle (Bayes, true params)", "black", ":")}
INIT_STYLE = {"init": ("init alone", "tab:brown", (0, (1, 3)))}


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _mean_curve(runs, key: str) -> tuple[list[int], list[float]]:
    """Mean over a point's seeds of `key` in val rows, at steps every seed logged."""
    by_step: dict[int, list[float]] = {}
    for run in runs:
        for row in run.val_rows:
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                by_step.setdefault(row["step"], []).append(value)
    steps = sorted(s for s, v in by_step.items() if len(v) == len(runs))
    return steps, [float(np.mean(by_step[s])) for s in steps]


def curves(points: Sequence[Point], path: Path) -> Path:
    """Test loss / train loss and err against step, one colour per point, with EM / Lloyd / oracle levels."""
    keys = varying_keys(points)
    order = sorted(points, key=lambda p: tuple(_sort_value(p.values.get(k)) for k in keys))
    colours = plt.cm.viridis(np.linspace(0, 0.9, max(len(order), 1)))
    same_task = len({repr({k: v for k, v in p.values.items() if k.startswith(("task.", "eval."))})
                     for p in points}) == 1
    rows = math.ceil(len(order) / 3) + 2  # legend lines below the panels
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(13, 4.4 + 0.2 * rows))
    for point, colour in zip(order, colours):
        name = label(point.values, keys)
        steps, loss = _mean_curve(point.runs, "loss")
        ax_loss.plot(steps, loss, color=colour, label=name)
        steps, train = _mean_curve(point.runs, "train_loss")
        if steps:
            ax_loss.plot(steps, train, color=colour, ls=(0, (2, 2)), lw=1)
        steps, err = _mean_curve(point.runs, "err")
        ax_err.plot(steps, err, color=colour)
        if not same_task:
            ax_err.axhline(point.mean("err_em"), color=colour, ls=":", lw=1)
    if same_task and points:
        for ax, metric in ((ax_loss, "loss"), (ax_err, "err")):
            for method, (name, colour, style) in (BASELINE_STYLE | INIT_STYLE).items():
                levels = [p.mean(f"{metric}_{method}") for p in points]
                level = float(np.mean([v for v in levels if math.isfinite(v)])) if any(map(math.isfinite, levels)) \
                    else math.nan
                if math.isfinite(level) and level > 0:
                    ax.axhline(level, color=colour, ls=style, lw=1.3, label=f"{name} {metric}: {level:.3g}")
            ax.legend(loc="upper right", handles=[h for h in ax.get_lines() if h.get_label().startswith(
                tuple(v[0] for v in (BASELINE_STYLE | INIT_STYLE).values()))])
    ax_loss.set(xlabel="training step", ylabel="cross-entropy on the eval set", yscale="log",
                title="test loss (solid), loss on the training episodes (dashed)")
    err_title = "mis-clustering rate on the eval set" + ("" if same_task else " (dotted: EM, same colour)")
    ax_err.set(xlabel="training step", ylabel="err (permutation-minimised)", yscale="log", title=err_title)
    handles = [h for h in ax_loss.get_lines() if h.get_label() and not h.get_label().startswith(("_",
               *(v[0] for v in (BASELINE_STYLE | INIT_STYLE).values())))]
    fig.legend(handles=handles, loc="lower center", ncol=min(3, max(1, len(handles))), frameon=False,
               fontsize=8, title="seed means per configuration" if keys else None)
    fig.tight_layout(rect=(0, 0.045 * rows / (1 + 0.05 * rows), 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def _sort_value(value):
    return (0, value) if isinstance(value, (int, float)) and value is not None else (1, repr(value))


def _n_axis(ax, sizes: Sequence[float]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xlim(min(sizes) / 1.3, max(sizes) * 1.3)  # an axis with nothing drawn has no positive limits to log
    ax.set_xticks(sizes)
    ax.set_xticklabels([f"{int(n)}" for n in sizes], rotation=0)


def sample_complexity(sc: SampleComplexity, path: Path) -> Path:
    """Left: excess test loss and train/test gap vs N (log-log) with fits and N^(−1/2); middle: loss −
    oracle loss; right: err − err_oracle (no fits: they flatten at the approximation floor)."""
    fig, (ax, ax_oracle, ax_err) = plt.subplots(1, 3, figsize=(15, 4.6))
    shade = [n for n in sc.memorised]
    series = ((sc.excess, "test loss$_N$ − test loss$_\\infty$", "tab:blue", "o", sc.excess_fit, sc.excess_intercept,
               sc.fitted),
              (sc.gap, "train/test gap (test − pool loss)", "tab:orange", "s", sc.gap_fit, sc.gap_intercept,
               sc.gap_fitted))
    drawn = 0  # positive values on the log axis: with none (tiny runs), the axis stays linear and says so
    for values, name, colour, marker, fit, intercept, fitted in series:
        xs, means = [], []
        for n in sc.sizes:
            seeds = values.get(n, {})
            positive = [v for v in seeds.values() if v > 0]
            ax.scatter([n] * len(positive), positive, color=colour, alpha=0.35, s=14, marker=marker)
            mean = float(np.mean(list(seeds.values()))) if seeds else math.nan
            if mean > 0:
                drawn += 1
                xs.append(n)
                means.append(mean)
        ax.plot(xs, means, color=colour, marker=marker, lw=0, ms=7, label=f"{name} (seed mean)")
        if fit.ok and math.isfinite(intercept):
            grid = np.array(fitted, dtype=float)
            ax.plot(grid, np.exp(intercept) * grid ** fit.estimate, color=colour, lw=1.6,
                    label=f"fit b = {fit.estimate:.2f}, 95% CI {fit.describe()}")
    anchor = [n for n in sc.fitted if sc.excess.get(n) and np.mean(list(sc.excess[n].values())) > 0]
    if anchor:
        n0 = anchor[0]
        y0 = float(np.mean(list(sc.excess[n0].values())))
        grid = np.array(sc.sizes, dtype=float)
        ax.plot(grid, y0 * (grid / n0) ** -0.5, color="grey", ls="--", lw=1.2, label="reference N$^{-1/2}$")
    for a in (ax, ax_oracle, ax_err):
        if shade:
            a.axvspan(min(sc.sizes) / 1.3, max(shade) * 1.3, color="tab:red", alpha=0.08,
                      label="memorisation region (excluded from fits)")
    if drawn:
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no positive excess or gap to draw", transform=ax.transAxes, ha="center")
    ax.set(xlabel="N = pre-training episodes (pool size)", ylabel="loss difference (nats)",
           title="sample complexity: excess test loss and\ntrain/test gap vs N (fits exclude the shaded region)")
    _n_axis(ax, sc.sizes)
    ax.legend(loc="lower left")

    finite = [n for n in sc.sizes]
    for a, values, ylabel, title in (
            (ax_oracle, sc.loss_minus_oracle, "test loss − oracle loss (nats)", "test loss − oracle loss"),
            (ax_err, sc.err_minus_oracle, "err − err$_{oracle}$", "err − err$_{oracle}$")):
        a.plot(finite, [values.get(n, math.nan) for n in finite], "o-", color="tab:green", label="pool of N episodes")
        fresh = values.get(math.inf, math.nan)
        if math.isfinite(fresh):
            a.axhline(fresh, color="tab:green", ls="--", lw=1.2, label=f"fresh episodes (N = ∞): {fresh:.3g}")
        positive = all(values.get(n, 0) > 0 for n in finite) and fresh > 0
        a.set(yscale="log" if positive else "linear", xlabel="N = pre-training episodes", ylabel=ylabel,
              title=title + "\n(no fit: it floors at the approximation error)")
        _n_axis(a, finite)
        a.legend(loc="upper right")
    return _save(fig, path)


def axis_trends(depth: Sequence[AxisTrend], heads: Sequence[AxisTrend], path: Path) -> Path:
    """err against depth L (with EM run for L iterations) and against heads M, at the largest N."""
    panels = [(t, "model.depth") for t in [depth]] + [(t, "model.heads") for t in [heads]]
    panels = [(trends, axis) for trends, axis in panels if trends]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.6), squeeze=False)
    for ax, (trends, axis) in zip(axes[0], panels):
        short = SHORT_NAMES[axis]
        colours = plt.cm.plasma(np.linspace(0, 0.8, len(trends)))
        xs_all = sorted({x for t in trends for x in t.xs})
        for trend, colour in zip(trends, colours):
            for x in trend.xs:
                seeds = list(trend.err_seeds.get(x, {}).values())
                ax.scatter([x] * len(seeds), seeds, color=colour, alpha=0.35, s=14)
            ax.plot(trend.xs, [trend.err[x] for x in trend.xs], "o-", color=colour,
                    label=f"model, {trend.family} (Δerr per doubling {trend.fit.estimate:+.3g})")
        if axis == "model.depth":
            em = {}
            for trend in trends:
                for x, v in trend.err_em_depth.items():
                    if math.isfinite(v):
                        em.setdefault(x, []).append(v)
            if em:
                ks = sorted(em)
                ax.plot(ks, [np.mean(em[x]) for x in ks], "s--", color="tab:red", label="EM run for L iterations")
        else:
            level = float(np.nanmean([t.err_em for t in trends]))
            ax.axhline(level, color="tab:red", ls="--", label=f"EM (eval.em_iters iterations): {level:.3g}")
        oracle = float(np.nanmean([t.err_oracle for t in trends]))
        ax.axhline(oracle, color="black", ls=":", label=f"oracle: {oracle:.3g}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs_all)
        ax.set_xticklabels([f"{int(x)}" for x in xs_all])
        name = "depth L (layers)" if axis == "model.depth" else "heads M (per layer)"
        values = [v for t in trends for v in t.err.values()] + [oracle]
        wide = min(values) > 0 and max(values) / min(values) > 5
        ax.set(xlabel=name, ylabel="err (permutation-minimised)", yscale="log" if wide else "linear",
               title=f"err vs {short} at {trends[0].at_n}")
        ax.margins(y=0.12)  # the EM and oracle levels sit at the edges otherwise
        ax.legend(loc="best", fontsize=7)
    return _save(fig, path)


def separation(trends: Sequence[SeparationTrend], path: Path) -> Path:
    """err against Δ (log scale) for model / EM / Lloyd / oracle, and err_model / err_oracle per Δ."""
    fig, (ax, ax_ratio) = plt.subplots(1, 2, figsize=(13, 4.6))
    styles = {"model": ("model", "tab:blue", "-", "o")} | {m: (n, c, s, "s") for m, (n, c, s) in BASELINE_STYLE.items()}
    for i, trend in enumerate(trends):
        suffix = f" ({trend.family})" if len(trends) > 1 else ""
        for method, (name, colour, style, marker) in styles.items():
            values = trend.err[method]
            xs = [d for d in trend.deltas if values.get(d, 0) > 0]
            ax.plot(xs, [values[d] for d in xs], color=colour, ls=style, marker=marker, ms=5,
                    label=f"{name}{suffix}" if i == 0 or suffix else None)
        for method, colour in (("model", "tab:blue"), ("em", "tab:red")):
            xs = [d for d in trend.deltas if math.isfinite(trend.ratio(method, d))]
            ax_ratio.plot(xs, [trend.ratio(method, d) for d in xs], "o-", color=colour,
                          label=f"err$_{{{method}}}$ / err$_{{oracle}}${suffix}")
        if trend.fitted:
            d0 = trend.fitted[0]
            y0 = trend.err["oracle"][d0]
            grid = np.linspace(min(trend.deltas), max(trend.deltas), 50)
            if y0 > 0:
                ax.plot(grid, y0 * np.exp(RATE_SLOPE * (grid ** 2 - d0 ** 2)), color="grey", lw=1,
                        label="reference exp(−Δ²/8) (through the oracle)" if i == 0 else None)
            if trend.fit.ok:
                ax.set_title(f"err vs separation; model slope of log err vs Δ²: {trend.fit.estimate:.3f} "
                             f"{trend.fit.describe(3)}", fontsize=10)
    ax.set(yscale="log", xlabel="separation Δ = min ‖μ_a − μ_b‖ / σ", ylabel="err (permutation-minimised)")
    if not ax.get_title():
        ax.set_title("err vs separation")
    ax.legend(loc="lower left")
    ax_ratio.axhline(1.0, color="black", ls=":", lw=1)
    ax_ratio.set(yscale="log", xlabel="separation Δ", ylabel="ratio to the oracle's err",
                 title="how far from the minimax floor (1 = oracle)")
    ax_ratio.legend(loc="upper left")
    return _save(fig, path)


def passes_against_em(comparisons: Sequence[PassesAgainstEm], path: Path) -> Path:
    """err after t passes (model) and after t iterations (EM, same init) against t, one panel per point, with
    each seed mean's interval as error bars where it has one."""
    fig, axes = plt.subplots(1, len(comparisons), figsize=(5.5 * len(comparisons), 4.2), squeeze=False)
    for ax, comparison in zip(axes[0], comparisons):
        for side, (name, colour, style) in (("model", ("model, t passes", "tab:blue", "-")),
                                            ("em", (f"{BASELINE_STYLE['em'][0]}, t iterations",
                                                    *BASELINE_STYLE["em"][1:]))):
            intervals = getattr(comparison, side)
            ts = np.asarray(comparison.passes, dtype=float) + (0.06 if side == "em" else -0.06)
            estimates = np.array([i.estimate for i in intervals])
            below = np.array([i.estimate - i.low if i.ok else 0.0 for i in intervals])
            above = np.array([i.high - i.estimate if i.ok else 0.0 for i in intervals])
            ax.errorbar(ts, estimates, yerr=[below, above], color=colour, ls=style, marker="o", ms=4, capsize=3,
                        label=name)
        ax.set(xlabel="t (model passes / EM iterations, same init)", ylabel="err (permutation-minimised)",
               title=comparison.point, xticks=comparison.passes)
        ax.legend(loc="upper right")
    return _save(fig, path)
