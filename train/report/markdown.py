"""report.md: the summary, one section per check with its figure, table and rule, and the rules at the end.

Rendering only: every number comes from the typed sections (result.py, computed by checks.py); what a section
prints when the sweep cannot support it is the same NOT_IN_SWEEP the summary uses."""
from __future__ import annotations

import collections
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from emformer.train import rundir
from emformer.train.report import checks, scaling
from emformer.train.report.result import FIGURES, NOT_IN_SWEEP, ReportResult
from emformer.train.report.summary import fmt, size_set, unfinished_note, unidentified_note


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    return "\n".join(lines)


def render(result: ReportResult, sweep_dirs: Sequence[Path], names: Sequence[str]) -> str:
    """report.md's text: the summary table and its sentences, then one section per check, then the rules."""
    s = result.sections
    out: list[str] = [f"# Report: {', '.join(names)}", ""]
    out_flag = "" if result.out_dir == sweep_dirs[0] / "report" else f" --out {result.out_dir}"
    out.append(f"Made by `emformer report {' '.join(str(d) for d in sweep_dirs)}{out_flag}` from {len(result.runs)} runs "
               f"({sum(r.complete for r in result.runs)} complete, in {len(s.points)} distinct configurations). "
               "Each check states its figure, its 95% interval and its verdict; the rules are at the end.")
    out += ["", "## Summary", ""]
    out.append(md_table(["check", "figure", "estimate", "interval", "interval method", "target", "verdict"],
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
    out += ["", *_sample_section(s.sample_complexity)]
    out += ["", *_axis_section(s.depth, s.heads)]
    out += ["", *_separation_section(s.separation)]
    out += ["", *_beyond_section(s.beyond)]
    out += ["", *_rules_section()]
    return "\n".join(out) + "\n"


def _runs_section(result: ReportResult) -> list[str]:
    out = ["## Runs", ""]
    states = collections.Counter(run.state for run in result.runs)
    out.append("States: " + ", ".join(f"{n} {s}" for s, n in sorted(states.items())) + ". Only runs with DONE and "
               "at least one val row enter the checks; the others are listed here.")
    incomplete = [r for r in result.runs if not r.complete]
    if incomplete:
        out += ["", md_table(["run", "state", "why"], [(f"`{r.path}`", r.state, r.note) for r in incomplete])]
    if result.problems:
        out += ["", f"**Corrupt or unreadable input ({len(result.problems)}):** the report uses the rest of each file.", ""]
        out += [f"- `{p}`" for p in result.problems]
    return out


def _sample_section(sc: Optional[checks.SampleComplexity]) -> list[str]:
    out = ["## Sample complexity (DESIGN §3)", ""]
    if sc is None:
        return out + [f"{NOT_IN_SWEEP.capitalize()}: it needs runs that differ only in N, with ≥ 2 pool sizes "
                      "(data.source=pool, data.pool_size=N) and one run on fresh episodes (data.source=fresh, N = ∞)."]
    fresh = checks.seed_mean(sc.fresh_loss)
    out.append(f"Family: {sc.family}; {sc.seeds} seed(s)." + (f" ({sc.other_families} other N families in the sweep "
               "are not analysed: the one with the most pool sizes is.)" if sc.other_families else ""))
    out += ["", f"![sample complexity]({FIGURES['sample_complexity']})", ""]
    flagged = "; ".join(f"N = {int(n)}: {why}" for n, why in sorted(sc.memorised_by.items())) or "none"
    out.append(f"Memorisation rule (seed means; either criterion suffices, and every smaller N is memorised too): "
               f"(1) {checks.TRAIN_CRITERION}: the pool's train loss is below {checks.MEMORISED_TRAIN_FRACTION:g} × "
               f"the fresh run's train loss ({fmt(sc.fresh_train_loss, 4)}), i.e. the model fits its own pool far "
               f"better than any model fits fresh episodes; (2) {checks.INIT_CRITERION}: the test loss is above the "
               f"reference {fmt(sc.init_loss, 4)} = {sc.init_loss_rule}, i.e. the model predicts new "
               "episodes worse than its own initialisation. Neither looks at the other N or at a fitted slope: (1) "
               "reads train losses only, (2) compares each N's test loss with a fixed reference no fit uses. "
               f"Memorised (shaded, out of every fit): {flagged}. Floor: an N enters the two log-log "
               f"fits only when its seed-mean excess (paired with the same seed's fresh run) exceeds "
               f"{checks.FLOOR_SES:g} paired standard errors over seeds; below the floor: "
               f"{', '.join(str(int(n)) for n in sc.not_positive) or 'none'}."
               + (f" **The fresh run's own test loss ({fmt(fresh, 4)}) is "
                  "no better than the init alone: the runs are too short to have learned.**"
                  if fresh >= sc.init_loss else ""))
    verdict, reason = sc.verdict_and_reason
    out += ["", f"**Verdict: {verdict}** — {reason}."]
    rows = []
    for n in sc.sizes:
        status = "memorised" if n in sc.memorised else (
            f"below the floor ({fmt(sc.floor.get(n))})" if n in sc.not_positive else
            "fitted (upper half)" if n in sc.upper_fitted else "fitted")
        rows.append((int(n), len(sc.excess.get(n, {})), fmt(checks.seed_mean(sc.excess.get(n, {}))),
                     fmt(checks.seed_mean(sc.gap.get(n, {}))), fmt(sc.loss_minus_oracle.get(n)), fmt(sc.err_minus_oracle.get(n)), status))
    rows.append(("∞ (fresh)", len(sc.fresh_loss), f"0 (loss {fmt(fresh, 4)})", fmt(sc.fresh_gap),
                 fmt(sc.loss_minus_oracle.get(math.inf)), fmt(sc.err_minus_oracle.get(math.inf)), "reference"))
    out += ["", md_table(["N", "seeds", "test loss_N − loss_∞", "train/test gap", "loss − oracle loss",
                           "err − err_oracle", "status"], rows)]
    estimates = [(f"all fitted N {size_set(sc.fitted)}", sc.excess_fit),
                 (f"upper half {size_set(sc.upper_fitted)}", sc.upper_fit),
                 (f"free asymptote over N ∈ {size_set(sc.asymptote_sizes)}", sc.asymptote_fit)]
    out += ["", md_table(["estimate of b", "value", "interval", "method", "verdict (b ≤ −1/2)"],
                          [(what, fmt(fit.estimate), fit.describe(), fit.label,
                            scaling.verdict(fit, checks.SAMPLE_COMPLEXITY_BOUND) + unidentified_note(fit))
                           for what, fit in estimates])]
    if sc.asymptote_params:
        l_inf, a, b = sc.asymptote_params
        out += ["", f"Free-asymptote fit on the seed means: L_N = {fmt(l_inf, 4)} + {fmt(a)}·N^{fmt(b)}; the fitted "
                    f"L_∞ = {fmt(l_inf, 4)} against the fresh run's test loss {fmt(fresh, 4)} (difference "
                    f"{fmt(l_inf - fresh)})."]
    out += ["", f"The train/test gap is fitted over N ∈ {size_set(sc.gap_fitted)}, where its seed mean exceeds the fresh "
                f"run's |gap| = {fmt(abs(sc.fresh_gap))} (the noise between two finite episode sets): b = "
                f"{fmt(sc.gap_fit.estimate)} {sc.gap_fit.describe()} ({sc.gap_fit.label}). The bound of the paper is "
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
                rows.append((int(x), fmt(trend.err[x]), fmt(em), fmt(trend.err_oracle),
                             fmt(trend.err[x] / em if em and em > 0 else math.nan)))
            out += ["", f"{short} at {trend.at_n}, {trend.family}: slope {fmt(trend.fit.estimate)} per doubling "
                        f"{trend.fit.describe(4)} ({trend.fit.label}): **{trend.verdict}**"
                        f"{unfinished_note(trend.incomplete)}", "", md_table(header, rows)]
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
        rows = [(fmt(d), *(fmt(trend.err[m].get(d)) for m in ("model", "em", "lloyd", "oracle")),
                 fmt(trend.ratio("model", d)), fmt(trend.ratio("em", d)),
                 "fitted" if d in trend.fitted else f"excluded: {trend.excluded[d]}") for d in trend.deltas]
        out += ["", f"{trend.family}: slope {fmt(trend.fit.estimate)} {trend.fit.describe(3)} ({trend.fit.label}; "
                    f"oracle {fmt(trend.oracle_slope)}): **{trend.verdict}**{unfinished_note(trend.incomplete)}", "",
                md_table(["Δ", "model", "EM", "Lloyd", "oracle", "model / oracle", "EM / oracle", "fit"], rows)]
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
    table = [(r.setting, ", ".join(r.outside) or "inside the theory", r.seeds, fmt(r.err), fmt(r.err_em),
              fmt(r.err_lloyd), fmt(r.err_oracle), r.describe_difference(), r.se_method, f"**{r.beats_em}**")
             for r in rows]
    return out + ["", md_table(["setting", "outside the theory", "seeds", "err model", "err EM", "err Lloyd",
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
