"""`emformer report SWEEP_DIR [SWEEP_DIR ...] [--out DIR]`: check a sweep against the theory (DESIGN §3).

Reads every run's config and metrics log through train/rundir.py (no wandb needed) and writes `report.md` with PNG figures:
training curves, the sample-complexity check (excess test loss and train/test gap against N, slope with a
bootstrap interval over seeds, against b ≤ −1/2), err against depth and heads at the largest N, err against
the separation Δ (slope of log err against Δ², theory −1/8), and model-vs-EM per setting outside the theory.
With `--test-shift task.n=128` (repeatable) it also evaluates every run's checkpoint on its task with other
values at test time (k, n, Δ, weights, noise) against EM on the same episodes. Sections the sweep cannot
support say "not in this sweep". Runs that are missing, unfinished or have corrupt
metrics lines are listed in the report (with file and line), never dropped silently.

Exit status: 0 when the report is written and every metrics line was read; 1 when it is written but some
metrics line or config was corrupt (each is printed to stderr as FILE:LINE: what is wrong, and listed in the
report); 2 for a user error (no such sweep directory, no runs in it).
"""
from __future__ import annotations

import argparse
import collections
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from emformer.atomic import atomic_write_text
from emformer.errors import ConfigError
from emformer.train import rundir
from emformer.train.report import checks
from emformer.train.report import records, scaling
from emformer.train.report import shift as report_shift
from emformer.train.report.records import RunRecord

FIGURES = {"curves": "curves.png", "sample_complexity": "sample_complexity.png", "depth_heads": "depth_heads.png",
           "separation": "separation.png"}
NOT_IN_SWEEP = "not in this sweep"


@dataclass
class Check:
    """One row of the summary table."""

    name: str
    figure: str
    estimate: str
    interval: str
    target: str
    verdict: str
    sentence: str
    method: str = "—"
    """how the interval was made, e.g. "95% t (3 seeds)" (scaling.Interval.label)"""


@dataclass
class ReportResult:
    out_dir: Path
    report_path: Path
    figures: dict[str, Path]
    checks: list[Check]
    runs: list[RunRecord]
    problems: list[str]
    """corrupt metrics lines / unreadable configs or index (FILE:LINE: what)"""
    wandb: str = ""
    sections: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 1 if self.problems else 0


# --------------------------------------------------------------------------- the report
def build_report(sweep_dir: str | Path | Sequence[str | Path], out_dir: str | Path | None = None, *,
                 wandb_mode: str = "auto", test_shifts: Sequence[str] = ()) -> ReportResult:
    """Read the sweep dir(s), compute every check, write report.md + PNGs to out_dir (default: the first
    sweep dir's `report/`), log the figures to wandb if the runs use it; return what was written.

    `test_shifts` ("task.n=128", "task.k=3,task.n=32", ...): also evaluate every complete run's checkpoint on
    its task with these values at test time, against EM on the same episodes (report.shift)."""
    sweep_dirs = [Path(sweep_dir)] if isinstance(sweep_dir, (str, Path)) else [Path(p) for p in sweep_dir]
    if not sweep_dirs:
        raise ConfigError("report: give at least one sweep directory")
    runs: list[RunRecord] = []
    problems: list[str] = []
    for directory in sweep_dirs:
        found, index_problems = records.read_sweep(directory)
        if not found:
            raise ConfigError(f"{directory}: no runs found (expected run directories with config.yaml, "
                              f"e.g. {directory}/runs/*/config.yaml, or an index.json naming them)")
        runs += found
        problems += index_problems
    problems += [p for run in runs for p in run.problems]
    shifted = []
    if test_shifts:
        shifted = report_shift.evaluate_shifts(runs, [report_shift.parse_shift(t) for t in test_shifts])
        problems += [r.problem for r in shifted if r.problem]
    out = Path(out_dir) if out_dir is not None else sweep_dirs[0] / "report"
    out.mkdir(parents=True, exist_ok=True)

    points = checks.group_points(runs)
    sample = checks.sample_complexity(points, runs)
    depth = checks.axis_trends(points, "model.depth", runs)
    heads = checks.axis_trends(points, "model.heads", runs)
    separation = checks.separation_trends(points, runs)
    beyond = checks.beyond_theory(points, shifted)

    from emformer.train.report import plots  # matplotlib only when there is something to draw

    figures: dict[str, Path] = {}
    if points:
        figures["curves"] = plots.curves(points, out / FIGURES["curves"])
    if sample:
        figures["sample_complexity"] = plots.sample_complexity(sample, out / FIGURES["sample_complexity"])
    if depth or heads:
        figures["depth_heads"] = plots.axis_trends(depth, heads, out / FIGURES["depth_heads"])
    if separation:
        figures["separation"] = plots.separation(separation, out / FIGURES["separation"])

    summary = _summary_rows(sample, depth, heads, separation, beyond)
    names = [records.sweep_name(d) for d in sweep_dirs]
    result = ReportResult(out, out / "report.md", figures, summary, runs, problems,
                          sections={"points": points, "sample_complexity": sample, "depth": depth, "heads": heads,
                                    "separation": separation, "beyond": beyond})
    result.wandb = _log_to_wandb(result, names, wandb_mode)
    text = _markdown(result, sweep_dirs, names)
    atomic_write_text(result.report_path, text)
    return result


def _fmt(value: float, digits: int = 3) -> str:
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}g}"


def _unfinished_note(incomplete: Sequence[str]) -> str:
    return f" INCONCLUSIVE because these runs of the family did not finish or diverged: {'; '.join(incomplete)}." \
        if incomplete else ""


def _unidentified_note(fit: scaling.Interval) -> str:
    return f" ({fit.unidentified})" if fit.unidentified else ""


def _sizes(sizes: Sequence[float]) -> str:
    return "{" + ", ".join(str(int(n)) for n in sizes) + "}"


def _summary_rows(sample, depth, heads, separation, beyond) -> list[Check]:
    rows = []
    fig = FIGURES["sample_complexity"]
    name = "sample complexity: test loss_N − test loss_∞ ∝ N^b"
    if sample is None:
        rows.append(Check(name, "—", "—", "—", "b ≤ −0.5",
                          NOT_IN_SWEEP, "The sweep has no family of pool sizes with a fresh (N = ∞) run."))
    else:
        verdict, reason = sample.verdict_and_reason
        estimates = sample.estimates()
        rows.append(Check(name + " (all three estimates)", fig,
                          " / ".join(_fmt(fit.estimate, 3) for _, fit in estimates), "see below", "b ≤ −0.5", verdict,
                          f"Sample complexity over N ∈ {_sizes(sample.fitted)} (outside the memorisation region "
                          f"{_sizes(sample.memorised) if sample.memorised else '(none)'}, excess above "
                          f"{checks.FLOOR_SES:g} paired SE): {verdict} — {reason}.",
                          method=estimates[0][1].label))
        spans = (sample.fitted, sample.upper_fitted, sample.asymptote_sizes)
        for (what, fit), over in zip(estimates, spans):
            part = scaling.verdict(fit, checks.SAMPLE_COMPLEXITY_BOUND) if len(sample.fitted) >= checks.MIN_FITTED_SIZES \
                else scaling.NO_DATA
            rows.append(Check(f"  b from {what}", fig, _fmt(fit.estimate, 3), fit.describe(), "b ≤ −0.5", part,
                              f"b from {what} over N ∈ {_sizes(over)}: {_fmt(fit.estimate, 3)} ({fit.label} "
                              f"{fit.describe()}): {part}{_unidentified_note(fit)}.", method=fit.label))
        gap = sample.gap_fit
        rows.append(Check("sample complexity: train/test gap ∝ N^b", fig, _fmt(gap.estimate, 3), gap.describe(),
                          "b ≤ −0.5", sample.gap_verdict,
                          f"The train/test gap falls as N^{_fmt(gap.estimate, 2)} over N ∈ {_sizes(sample.gap_fitted)} "
                          f"({gap.label} {gap.describe()}; needs ≥ {checks.MIN_FITTED_SIZES} N above the fresh run's "
                          f"|gap|): {sample.gap_verdict}.{_unfinished_note(sample.incomplete)}", method=gap.label))
    for trends, axis, word in ((depth, "model.depth", "depth L"), (heads, "model.heads", "heads M")):
        if not trends:
            rows.append(Check(f"err falls with {word}", "—", "—", "—", "Δerr per doubling < 0", NOT_IN_SWEEP,
                              f"The sweep varies no {word} with everything else fixed."))
        for trend in trends:
            sentence = (f"At {trend.at_n}, {trend.family}: err changes by {_fmt(trend.fit.estimate)} per doubling of "
                        f"{word} ({trend.fit.label} {trend.fit.describe(4)}): {trend.verdict}."
                        f"{_unfinished_note(trend.incomplete)}")
            rows.append(Check(f"err falls with {word} ({trend.family})", FIGURES["depth_heads"], _fmt(trend.fit.estimate),
                              trend.fit.describe(4), "Δerr per doubling < 0", trend.verdict, sentence,
                              method=trend.fit.label))
    if not separation:
        rows.append(Check("minimax rate: log err ∝ −Δ²/8", "—", "—", "—", "slope ≤ −0.125", NOT_IN_SWEEP,
                          "The sweep varies no separation Δ with everything else fixed."))
    for trend in separation:
        sentence = (f"{trend.family}: log err falls against Δ² with slope {_fmt(trend.fit.estimate)} over Δ ∈ "
                    f"{{{', '.join(_fmt(d) for d in trend.fitted)}}} ({trend.fit.label} {trend.fit.describe(3)}; oracle "
                    f"{_fmt(trend.oracle_slope)}; theory −1/8 as Δ grows): {trend.verdict}."
                    f"{_unfinished_note(trend.incomplete)}")
        rows.append(Check(f"minimax rate: slope of log err vs Δ² ({trend.family})", FIGURES["separation"],
                          _fmt(trend.fit.estimate), trend.fit.describe(3), "slope ≤ −0.125", trend.verdict, sentence,
                          method=trend.fit.label))
    if beyond is None:
        rows.append(Check("beyond the theory: model vs EM", "—", "—", "—", "err < err_EM", NOT_IN_SWEEP,
                          "No run of the sweep is outside the theory's assumptions."))
    else:
        outside = [r for r in beyond if r.outside]
        wins = [r for r in outside if r.beats_em == "yes"]
        rows.append(Check("beyond the theory: model beats EM", "table", f"{len(wins)} of {len(outside)} settings", "—",
                          f"err − err_EM < −{checks.BEATS_EM_SES:g} SE", "—",
                          f"Outside the theory the model beats EM by more than {checks.BEATS_EM_SES:g} paired standard "
                          f"errors in {len(wins)} of {len(outside)} settings"
                          + (f": {'; '.join(r.setting for r in wins)}." if wins else ".")))
    return rows


def format_summary(result: ReportResult) -> str:
    """The summary table as aligned plain text (what `emformer report` and `emformer demo` print)."""
    header = ("check", "verdict", "estimate", "interval", "method", "target", "figure")
    rows = [header] + [(c.name, c.verdict, c.estimate, c.interval, c.method, c.target, c.figure)
                       for c in result.checks]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_summary(result: ReportResult, file=None) -> None:
    file = file or sys.stdout
    states = collections.Counter(run.state for run in result.runs)
    print(f"report: {result.report_path}", file=file)
    print(f"runs: " + ", ".join(f"{n} {s}" for s, n in sorted(states.items())), file=file)
    print(format_summary(result), file=file)
    for problem in result.problems:
        print(f"problem: {problem}", file=sys.stderr)


# --------------------------------------------------------------------------- markdown
def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _markdown(result: ReportResult, sweep_dirs: Sequence[Path], names: Sequence[str]) -> str:
    s = result.sections
    out: list[str] = [f"# Report: {', '.join(names)}", ""]
    out_flag = "" if result.out_dir == sweep_dirs[0] / "report" else f" --out {result.out_dir}"
    out.append(f"Made by `emformer report {' '.join(str(d) for d in sweep_dirs)}{out_flag}` from {len(result.runs)} runs "
               f"({sum(r.complete for r in result.runs)} complete, in {len(s['points'])} distinct configurations). "
               "Each check states its figure, its 95% interval and its verdict; the rules are at the end.")
    out += ["", "## Summary", ""]
    out.append(_md_table(["check", "figure", "estimate", "interval", "interval method", "target", "verdict"],
                         [(c.name, f"[{c.figure}]({c.figure})" if c.figure.endswith(".png") else c.figure,
                           c.estimate, c.interval, c.method, c.target, f"**{c.verdict}**") for c in result.checks]))
    out += [""] + [f"- {c.sentence}" for c in result.checks]
    out += ["", *_runs_section(result)]
    out += ["", "## Training curves", ""]
    if "curves" in result.figures:
        out.append("Test loss (solid) and loss on the training episodes (dashed; on the pool for finite N) against "
                   "step, seed means, one colour per configuration; horizontal lines are EM, Lloyd and the oracle on "
                   "the same eval set. Right: the mis-clustering rate.")
        out += ["", f"![training curves]({FIGURES['curves']})"]
    else:
        out.append("No complete run: nothing to plot.")
    out += ["", *_sample_section(s["sample_complexity"])]
    out += ["", *_axis_section(s["depth"], s["heads"])]
    out += ["", *_separation_section(s["separation"])]
    out += ["", *_beyond_section(s["beyond"])]
    out += ["", *_rules_section()]
    if result.wandb:
        out += ["", f"wandb: {result.wandb}"]
    return "\n".join(out) + "\n"


def _runs_section(result: ReportResult) -> list[str]:
    out = ["## Runs", ""]
    states = collections.Counter(run.state for run in result.runs)
    out.append("States: " + ", ".join(f"{n} {s}" for s, n in sorted(states.items())) + ". Only runs with DONE and "
               "at least one val row enter the checks; the others are listed here.")
    incomplete = [r for r in result.runs if not r.complete]
    if incomplete:
        out += ["", _md_table(["run", "state", "why"], [(f"`{r.path}`", r.state, r.note) for r in incomplete])]
    if result.problems:
        out += ["", f"**Corrupt or unreadable input ({len(result.problems)}):** the report uses the rest of each file.", ""]
        out += [f"- `{p}`" for p in result.problems]
    return out


def _sample_section(sc: Optional[checks.SampleComplexity]) -> list[str]:
    out = ["## Sample complexity (DESIGN §3)", ""]
    if sc is None:
        return out + [f"{NOT_IN_SWEEP.capitalize()}: it needs runs that differ only in N, with ≥ 2 pool sizes "
                      "(data.source=pool, data.pool_size=N) and one run on fresh episodes (data.source=fresh, N = ∞)."]
    out.append(f"Family: {sc.family}; {sc.seeds} seed(s)." + (f" ({sc.other_families} other N families in the sweep "
               "are not analysed: the one with the most pool sizes is.)" if sc.other_families else ""))
    out += ["", f"![sample complexity]({FIGURES['sample_complexity']})", ""]
    flagged = "; ".join(f"N = {int(n)}: {why}" for n, why in sorted(sc.memorised_by.items())) or "none"
    out.append(f"Memorisation rule (seed means; either criterion suffices, and every smaller N is memorised too): "
               f"(1) {checks.TRAIN_CRITERION}: the pool's train loss is below {checks.MEMORISED_TRAIN_FRACTION:g} × "
               f"the fresh run's train loss ({_fmt(sc.fresh_train_loss, 4)}), i.e. the model fits its own pool far "
               f"better than any model fits fresh episodes; (2) {checks.INIT_CRITERION}: the test loss is above the "
               f"reference {_fmt(sc.init_loss, 4)} = {sc.init_loss_rule}, i.e. the model predicts new "
               "episodes worse than its own initialisation. Neither looks at the other N or at a fitted slope: (1) "
               "reads train losses only, (2) compares each N's test loss with a fixed reference no fit uses. "
               f"Memorised (shaded, out of every fit): {flagged}. Floor: an N enters the two log-log "
               f"fits only when its seed-mean excess (paired with the same seed's fresh run) exceeds "
               f"{checks.FLOOR_SES:g} paired standard errors over seeds; below the floor: "
               f"{', '.join(str(int(n)) for n in sc.not_positive) or 'none'}."
               + (f" **The fresh run's own test loss ({_fmt(float(sum(sc.fresh_loss.values()) / len(sc.fresh_loss)), 4)}) is "
                  "no better than the init alone: the runs are too short to have learned.**"
                  if sum(sc.fresh_loss.values()) / len(sc.fresh_loss) >= sc.init_loss else ""))
    verdict, reason = sc.verdict_and_reason
    out += ["", f"**Verdict: {verdict}** — {reason}."]
    rows = []
    for n in sc.sizes:
        status = "memorised" if n in sc.memorised else (
            f"below the floor ({_fmt(sc.floor.get(n))})" if n in sc.not_positive else
            "fitted (upper half)" if n in sc.upper_fitted else "fitted")
        mean = lambda table: sum(table.values()) / len(table) if table else math.nan  # noqa: E731
        rows.append((int(n), len(sc.excess.get(n, {})), _fmt(mean(sc.excess.get(n, {}))), _fmt(mean(sc.gap.get(n, {}))),
                     _fmt(sc.loss_minus_oracle.get(n)), _fmt(sc.err_minus_oracle.get(n)), status))
    fresh = sum(sc.fresh_loss.values()) / len(sc.fresh_loss)
    rows.append(("∞ (fresh)", len(sc.fresh_loss), f"0 (loss {_fmt(fresh, 4)})", _fmt(sc.fresh_gap),
                 _fmt(sc.loss_minus_oracle.get(math.inf)), _fmt(sc.err_minus_oracle.get(math.inf)), "reference"))
    out += ["", _md_table(["N", "seeds", "test loss_N − loss_∞", "train/test gap", "loss − oracle loss",
                           "err − err_oracle", "status"], rows)]
    estimates = [(f"all fitted N {_sizes(sc.fitted)}", sc.excess_fit),
                 (f"upper half {_sizes(sc.upper_fitted)}", sc.upper_fit),
                 (f"free asymptote over N ∈ {_sizes(sc.asymptote_sizes)}", sc.asymptote_fit)]
    out += ["", _md_table(["estimate of b", "value", "interval", "method", "verdict (b ≤ −1/2)"],
                          [(what, _fmt(fit.estimate), fit.describe(), fit.label,
                            scaling.verdict(fit, checks.SAMPLE_COMPLEXITY_BOUND) + _unidentified_note(fit))
                           for what, fit in estimates])]
    if sc.asymptote_params:
        l_inf, a, b = sc.asymptote_params
        fresh = sum(sc.fresh_loss.values()) / len(sc.fresh_loss)
        out += ["", f"Free-asymptote fit on the seed means: L_N = {_fmt(l_inf, 4)} + {_fmt(a)}·N^{_fmt(b)}; the fitted "
                    f"L_∞ = {_fmt(l_inf, 4)} against the fresh run's test loss {_fmt(fresh, 4)} (difference "
                    f"{_fmt(l_inf - fresh)})."]
    out += ["", f"The train/test gap is fitted over N ∈ {_sizes(sc.gap_fitted)}, where its seed mean exceeds the fresh "
                f"run's |gap| = {_fmt(abs(sc.fresh_gap))} (the noise between two finite episode sets): b = "
                f"{_fmt(sc.gap_fit.estimate)} {sc.gap_fit.describe()} ({sc.gap_fit.label}). The bound of the paper is "
                "N^(−1/2) (grey dashed line). Loss − oracle loss and err − err_oracle are shown without a fit: they "
                "flatten at the approximation / optimisation floor."]
    if sc.incomplete:
        out += ["", f"**Unfinished or diverged runs in this family (the check is INCONCLUSIVE):** "
                    f"{'; '.join(sc.incomplete)}."]
    return out


def _axis_section(depth: list[checks.AxisTrend], heads: list[checks.AxisTrend]) -> list[str]:
    out = ["## Depth and heads", ""]
    if not depth and not heads:
        return out + [f"{NOT_IN_SWEEP.capitalize()}: it needs runs that differ only in model.depth (or model.heads)."]
    out += [f"![depth and heads]({FIGURES['depth_heads']})", ""]
    out.append("Theory: each layer can carry out one EM step, so err should fall with depth L towards EM run for L "
               "iterations; more heads M approximate the softmax of the E-step better. Measured at the largest N of "
               "the sweep; the check is the least-squares slope of err against log2 L (or log2 M), i.e. the "
               "change of err per doubling, with its interval over seeds (method named next to it).")
    for trends, axis, short in ((depth, "model.depth", "L"), (heads, "model.heads", "M")):
        if not trends:
            out += ["", f"{short}: {NOT_IN_SWEEP}."]
            continue
        for trend in trends:
            header = [short, "err (model)", "EM for L iterations" if short == "L" else "EM", "oracle", "model / EM"]
            rows = []
            for x in trend.xs:
                em = trend.err_em_depth.get(x, math.nan) if short == "L" else trend.err_em
                rows.append((int(x), _fmt(trend.err[x]), _fmt(em), _fmt(trend.err_oracle),
                             _fmt(trend.err[x] / em if em and em > 0 else math.nan)))
            out += ["", f"{short} at {trend.at_n}, {trend.family}: slope {_fmt(trend.fit.estimate)} per doubling "
                        f"{trend.fit.describe(4)} ({trend.fit.label}): **{trend.verdict}**"
                        f"{_unfinished_note(trend.incomplete)}", "", _md_table(header, rows)]
    return out


def _separation_section(trends: list[checks.SeparationTrend]) -> list[str]:
    out = ["## Separation and the minimax rate", ""]
    if not trends:
        return out + [f"{NOT_IN_SWEEP.capitalize()}: it needs runs that differ only in task.separation."]
    out += [f"![separation]({FIGURES['separation']})", ""]
    out.append(f"The optimal mis-clustering rate is exp(−(1+o(1))Δ²/8). Fit: least squares of log err_model against "
               f"Δ² over Δ where the oracle err is < {checks.ORACLE_FIT_MAX_ERR} (well separated) and the model makes "
               f"≥ {checks.MIN_RESOLVED_ERRORS} errors on the eval set (resolved); check: slope ≤ −1/8. At finite Δ "
               "the oracle's own slope is steeper than −1/8 (Φ(−Δ/2) has a polynomial factor), shown for comparison.")
    for trend in trends:
        rows = [(_fmt(d), *(_fmt(trend.err[m].get(d)) for m in ("model", "em", "lloyd", "oracle")),
                 _fmt(trend.ratio("model", d)), _fmt(trend.ratio("em", d)),
                 "fitted" if d in trend.fitted else f"excluded: {trend.excluded[d]}") for d in trend.deltas]
        out += ["", f"{trend.family}: slope {_fmt(trend.fit.estimate)} {trend.fit.describe(3)} ({trend.fit.label}; "
                    f"oracle {_fmt(trend.oracle_slope)}): **{trend.verdict}**{_unfinished_note(trend.incomplete)}", "",
                _md_table(["Δ", "model", "EM", "Lloyd", "oracle", "model / oracle", "EM / oracle", "fit"], rows)]
    return out


def _beyond_section(rows: Optional[list[checks.SettingRow]]) -> list[str]:
    out = ["## Beyond the theory's assumptions", ""]
    if rows is None:
        return out + [f"{NOT_IN_SWEEP.capitalize()}: no run has init none, unequal weights, or diagonal / Student-t "
                      "noise (configs/sweeps/beyond.yaml has them), and no --test-shift was asked for."]
    out.append(f"Model err against EM err (same init, same eval set) per setting. 'beats EM' is yes when err − err_EM "
               f"is below −{checks.BEATS_EM_SES:g} paired standard errors, no when above +{checks.BEATS_EM_SES:g}, tie "
               "otherwise (as benchmarks/bench_quality.py decides). The SE is the larger of the paired SE over seeds "
               "and, where the episodes were scored (rows 'test ...'), the mean paired per-episode SE; with one seed "
               "and no scored episodes there is none and the row is undecided. Rows marked 'test ...' evaluate the "
               "run's checkpoint (best, else last) on its test set (eval.test_seed) drawn with those task values "
               "(`emformer report --test-shift task.n=128`), EM and the oracle on the same episodes.")
    table = [(r.setting, ", ".join(r.outside) or "inside the theory", r.seeds, _fmt(r.err), _fmt(r.err_em),
              _fmt(r.err_lloyd), _fmt(r.err_oracle), r.describe_difference(), r.se_method, f"**{r.beats_em}**")
             for r in rows]
    return out + ["", _md_table(["setting", "outside the theory", "seeds", "err model", "err EM", "err Lloyd",
                                 "err oracle", "err − err_EM ± SE", "SE", "beats EM"], table)]


def _rules_section() -> list[str]:
    return ["## Rules (exactly what is computed)", "",
            f"- Values are from each run's last val row (highest step) in {rundir.METRICS}; a point is the set of runs "
            "with equal configs up to trainer.seed / data.seed, and its value is the mean over those seeds.",
            "- N = data.pool_size for data.source=pool, ∞ for data.source=fresh.",
            "- Slopes are least-squares fits on seed means. 95% intervals, named next to each: with ≥ "
            f"{scaling.MIN_SEEDS_FOR_BOOTSTRAP} seeds a percentile seed bootstrap ({scaling.N_BOOT} draws, generator "
            "seed 0; a draw without a fit counts as beyond either end); with 2–4 seeds a Student t interval over the "
            "per-seed estimates (seeds − 1 degrees of freedom); with 1 seed none (NOT ENOUGH DATA).",
            "- A check whose family has an unfinished (no DONE) or diverged (non-finite final loss) run is "
            "INCONCLUSIVE and names the runs.",
            "- test loss_N − test loss_∞ uses the mean fresh-run loss over the same drawn seeds; the train/test gap "
            "is metrics `loss` − `train_loss` in the final val row.",
            "- Verdicts: PASS when the whole interval meets the target, FAIL when the whole interval misses it, "
            "INCONCLUSIVE when it straddles the threshold, NOT ENOUGH DATA without a fit.",
            f"- Memorisation region (sample complexity): N whose seed-mean train loss is below "
            f"{checks.MEMORISED_TRAIN_FRACTION:g} × the fresh run's, or whose seed-mean test loss is above the init-only "
            "loss, and every smaller N; it is left out of every fit, and the section names the criterion that "
            "flagged each N.",
            f"- The free-asymptote exponent is the best b on a grid over [{scaling.ASYMPTOTE_EXPONENTS[0]:g}, "
            f"{scaling.ASYMPTOTE_EXPONENTS[-1]:g}]; a best fit on an end of the grid is not identified by the data and "
            "that estimate is INCONCLUSIVE (at the bound of the search grid).",
            "- Depth / heads: points at the largest N in the sweep, one family per value of the other keys."]


# --------------------------------------------------------------------------- wandb
def _log_to_wandb(result: ReportResult, names: Sequence[str], requested: str) -> str:
    """Log figures and the summary to the sweep's wandb group; returns a note for the report ('' if off)."""
    configs = [r.config.get("wandb", {}) for r in result.runs if r.config]
    mode = requested
    if mode == "auto":
        modes = collections.Counter(c.get("mode", "offline") for c in configs)
        mode = modes.most_common(1)[0][0] if modes else "disabled"
    if mode == "disabled" or not result.figures:
        return ""
    groups = collections.Counter(c.get("group") for c in configs if c.get("group"))
    group = groups.most_common(1)[0][0] if groups else names[0]
    project = next((c.get("project") for c in configs if c.get("project")), "emformer")
    entity = next((c.get("entity") for c in configs if c.get("entity")), None)
    try:
        import wandb

        run = wandb.init(project=project, entity=entity, group=group, job_type="report", name=f"report-{group}",
                         dir=str(result.out_dir), mode=mode, reinit=True,
                         config={"sweeps": list(names), "runs": len(result.runs)})
        run.log({f"report/{name}": wandb.Image(str(path)) for name, path in result.figures.items()})
        run.log({"report/summary": wandb.Table(columns=["check", "estimate", "interval", "target", "verdict"],
                                               data=[[c.name, c.estimate, c.interval, c.target, c.verdict]
                                                     for c in result.checks])})
        run.finish()
    except Exception as exc:  # wandb is a side channel: the report on disk is the record
        return f"figures not logged ({type(exc).__name__}: {exc})"
    return f"figures logged to project {project}, group {group} ({mode})"


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep_dirs", nargs="+", metavar="SWEEP_DIR",
                        help="sweep directory (from `emformer sweep --out`); several are combined into one report")
    parser.add_argument("--out", default=None, help="where report.md and the PNGs go (default: SWEEP_DIR/report)")
    parser.add_argument("--test-shift", action="append", default=[], metavar="task.KEY=VALUE[,...]",
                        help="also evaluate every run's checkpoint with these task values at test time (k, n, "
                             "separation, weights, noise ...) against EM; repeat for several settings")
    parser.add_argument("--wandb", default="auto", choices=("auto", "offline", "online", "disabled"),
                        help="log the figures to the sweep's wandb group (auto: the mode in the runs' configs)")


def run(args: argparse.Namespace) -> int:
    result = build_report(args.sweep_dirs, args.out, wandb_mode=args.wandb, test_shifts=args.test_shift)
    print_summary(result)
    return result.exit_code
