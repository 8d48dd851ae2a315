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
from emformer.train.report.summary import fmt, percent, size_set, unfinished_note, unidentified_note


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
    out += ["", *_em_section(s.em)]
    if s.passes:  # only sweeps with a model trained to iterate (configs/sweeps/beyond.yaml has one)
        out += ["", *_passes_section(s.passes)]
    out += ["", *_beyond_section(s.beyond)]
    out += ["", *_noise_section(s)]
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
               f"{', '.join(str(int(n)) for n in sc.not_positive) or 'none'}. These choices are on the data; "
               "every bootstrap draw makes all of them again on its own resampled table (region, floor, fitted N, "
               "upper half), so the intervals include the uncertainty of the choices."
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
               "change of err per doubling, divided by the family's mean err: a relative change per doubling, with "
               "its interval (method named next to it). Verdict, against the smallest effect worth having that the "
               "sweep spec declares (report.smallest_effect, a fraction of err per doubling): "
               f"{checks.NO_EFFECT} when the whole interval lies inside ± that margin (both one-sided tests reject an "
               f"effect of its size), else {checks.FALLS} when the whole interval is below 0, {checks.RISES} when above, "
               "else INCONCLUSIVE.")
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
            rel = trend.relative_fit
            out += ["", f"{short} at {trend.at_n}, {trend.family}: slope {fmt(trend.fit.estimate)} per doubling "
                        f"{trend.fit.describe(4)}, relative {percent(rel.estimate)} [{percent(rel.low)}, "
                        f"{percent(rel.high)}] of err per doubling ({rel.label}; margin ±{100 * trend.margin:g}%): "
                        f"**{trend.verdict}**{unfinished_note(trend.incomplete)}", "", md_table(header, rows)]
    return out


def _separation_section(trends: list[checks.SeparationTrend]) -> list[str]:
    out = ["## Separation and the minimax rate", ""]
    if not trends:
        return out + [f"{NOT_IN_SWEEP.capitalize()}: it needs runs that differ only in task.separation."]
    out += [f"![separation]({FIGURES['separation']})", ""]
    out.append(f"The optimal mis-clustering rate is exp(−(1+o(1))Δ²/8). Fit: least squares of log err_model against "
               f"Δ² over Δ where the oracle err is < {checks.ORACLE_FIT_MAX_ERR} (well separated) and the model makes "
               f"≥ {checks.MIN_RESOLVED_ERRORS} errors on the eval set (resolved); check: slope ≤ −1/8. At finite Δ "
               "the oracle's own slope is steeper than −1/8 (Φ(−Δ/2) has a polynomial factor), shown for comparison. "
               "That slope cannot tell the model from the oracle: any error that is a constant multiple of the "
               "oracle's passes. The rate claim itself is tested by the slope of log(err / err_oracle) against Δ² "
               f"over the same Δ: flat means the model keeps the oracle's rate; the check passes when the whole "
               f"interval is ≤ {fmt(checks.RATIO_MARGIN)} (a quarter of the minimax exponent 1/8). The Δ left out "
               "are chosen on the data and again inside every bootstrap draw.")
    for trend in trends:
        rows = [(fmt(d), *(fmt(trend.err[m].get(d)) for m in ("model", "em", "lloyd", "oracle")),
                 fmt(trend.ratio("model", d)), fmt(trend.ratio("em", d)),
                 "fitted" if d in trend.fitted else f"excluded: {trend.excluded[d]}") for d in trend.deltas]
        out += ["", f"{trend.family}: slope {fmt(trend.fit.estimate)} {trend.fit.describe(3)} ({trend.fit.label}; "
                    f"oracle {fmt(trend.oracle_slope)}): **{trend.verdict}**{unfinished_note(trend.incomplete)}. "
                    f"Ratio slope {fmt(trend.ratio_fit.estimate)} {trend.ratio_fit.describe(4)}: "
                    f"**{trend.ratio_verdict}**.", "",
                md_table(["Δ", "model", "EM", "Lloyd", "oracle", "model / oracle", "EM / oracle", "fit"], rows)]
    return out


def _em_section(rows: Sequence[checks.EmComparison]) -> list[str]:
    out = ["## The model against EM from the same init", ""]
    if not rows:
        return out + ["No point has both err and err_em in its final row."]
    out.append("err − err_EM at every point: EM runs from the init the model is given, on the same eval episodes, "
               "so the difference is taken episode by episode. Its interval resamples seeds and, where the runs "
               f"saved them, the eval episodes (method named). {checks.BEATS} when the whole interval is below 0, "
               f"{checks.LOSES} when above, {checks.TIE} otherwise.")
    return out + ["", md_table(["point", "err model", "err EM", "err − err_EM", "interval", "method", "verdict"],
                               [(r.point, fmt(r.err), fmt(r.err_em), fmt(r.difference.estimate),
                                 r.difference.describe(4), r.difference.label, f"**{r.verdict}**") for r in rows])]


def _passes_section(comparisons: Sequence[checks.PassesAgainstEm]) -> list[str]:
    out = ["## Passes against EM iterations", "",
           "A model trained to iterate (model.passes = T) run for t = 1..T passes beside EM run for t iterations "
           "from the same init, on the same eval episodes (each run's final evaluation, episodes.npz): does each "
           "pass do at least what an EM iteration does? err − err_EM is taken episode by episode and its interval "
           f"resamples seeds and eval episodes (method named); {checks.BEATS} when the whole interval is below 0, "
           f"{checks.LOSES} when above, {checks.TIE} otherwise, as in the section above.", "",
           f"![passes against EM iterations]({FIGURES['passes']})"]
    for comparison in comparisons:
        rows = [(t, fmt(model.estimate), model.describe(4), fmt(em.estimate), em.describe(4),
                 fmt(row.difference.estimate), row.difference.describe(4), f"**{row.verdict}**")
                for t, model, em, row in zip(comparison.passes, comparison.model, comparison.em, comparison.rows)]
        out += ["", f"{comparison.point} ({comparison.rows[0].difference.label}):", "",
                md_table(["t", "err after t passes", "interval", "EM err after t iterations", "interval",
                          "err − err_EM", "interval", "verdict"], rows)]
    return out


OLD_SHARED_SET = 512
"""the eval set every seed shared before eval.seed derived from data.seed (eval.episodes of the study then)"""


def _noise_section(s: Any) -> list[str]:
    """Each check's statistic resampled over one source at a time: the seeds, or the eval episodes."""
    rows = []
    if s.sample_complexity is not None and s.sample_complexity.noise:
        rows.append(("sample complexity: b from all fitted N", *s.sample_complexity.noise,
                     s.sample_complexity.excess_fit))
    for trend in [*s.depth, *s.heads]:
        if trend.noise:
            rows.append((f"{'depth L' if trend.axis == 'model.depth' else 'heads M'}: relative change per doubling "
                         f"({trend.family})", *trend.noise, trend.relative_fit))
    for trend in s.separation:
        if trend.noise:
            rows.append((f"separation: slope of log err vs Δ² ({trend.family})", *trend.noise, trend.fit))
    for comparison in s.passes:
        last = comparison.rows[-1].difference
        if last.noise:
            rows.append((f"passes against EM iterations: err − err_EM at t = {comparison.passes[-1]} "
                         f"({comparison.point})", *last.noise, last))
    out = ["## Noise budget: seeds against eval episodes", ""]
    if not rows:
        return out + ["The runs saved no per-episode results (episodes.npz), so the eval episodes' share of the "
                      "noise cannot be told apart from the seeds'."]
    out.append("The SD of each check's statistic over the bootstrap draws that resample only the training seeds (the "
               "eval episodes held as they are) and over those that resample only the eval episodes (the seeds "
               "held). Every seed has its own eval set, so the seeds' spread holds that eval noise too: a ratio "
               "well below 1 means the seeds' own differences dominate and a larger eval set would change little; "
               "a ratio near or above 1 means the seed-to-seed differences of that statistic are mostly eval noise, "
               "and a larger eval set (eval.episodes) would narrow its interval. The last column is the SD the "
               f"eval noise alone would have if every seed shared one eval set of {OLD_SHARED_SET} episodes, as "
               "sweeps did before each seed had its own: SD from the episodes × sqrt(seeds × episodes / "
               f"{OLD_SHARED_SET}). That noise was common to every seed, so no seed bootstrap could see it, and "
               "two replications on two such sets differ by √2 times it from the eval sets alone.")
    table = []
    for name, a, b, fit in rows:
        shared = b * math.sqrt(fit.n_seeds * fit.episodes / OLD_SHARED_SET) if fit.episodes else math.nan
        table.append((name, fmt(a), fmt(b), fmt(b / a if a > 0 else math.nan, 2), fmt(shared)))
    return out + ["", md_table(["statistic", "SD from the seeds", "SD from the eval episodes", "episodes / seeds",
                                f"eval SD on one shared set of {OLD_SHARED_SET}"], table)]


def _beyond_section(rows: Optional[list[checks.SettingRow]]) -> list[str]:
    out = ["## Beyond the theory's assumptions", ""]
    if rows is None:
        return out + [f"{NOT_IN_SWEEP.capitalize()}: no run has init none, unequal weights, or diagonal / Student-t "
                      "noise (configs/sweeps/beyond.yaml has them), and no --test-shift was asked for."]
    out.append(f"Model err against EM err (same init, same eval set) per setting. 'beats EM' is yes when err − err_EM "
               f"is below −{checks.BEATS_EM_SES:g} paired standard errors, no when above +{checks.BEATS_EM_SES:g}, tie "
               "otherwise (as benchmarks/bench_quality.py decides). Where the runs saved their episodes the interval of "
               "the two-level bootstrap decides instead (yes / no when it excludes 0); on rows 'test ...' the SE "
               "combines the paired SE over seeds and the per-episode one in quadrature; with one seed "
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
            "- Slopes are least-squares fits on seed means. 95% intervals, named next to each (train/report/resample.py): "
            f"with ≥ {scaling.MIN_SEEDS_FOR_BOOTSTRAP} seeds a two-level bootstrap t interval ({scaling.N_BOOT} draws "
            "per level, generator seed 0). One set of draws resamples the seeds with replacement; one resamples the "
            "eval episodes (multinomial weights, one vector per eval set: every config of one seed shares its set, "
            "so contrasts stay paired episode by episode); one does the same with a vector per eval set and seed. "
            "Every draw makes every data-dependent choice of the check again. Variance: S/(S−1)·v_seeds + the share "
            "of eval sets common to several seeds, S/(S−1)·E/(E−1)·max(v_episodes − v_per_seed, 0), each v the "
            "square of half the 15.9–84.1 percentile range of its draws; interval: estimate ± t_{S−1}·sqrt(variance). "
            "Each seed has its own eval set (eval.seed derives from data.seed), so its eval noise is in the seeds' "
            "spread and the shared share is ~0; in sweeps whose seeds share one set it is that set's noise. "
            "A plain percentile interval of 5 seeds covers ~84% for a claimed 95%; the simulated studies of "
            "tests/train/report/test_calibration.py print this one's coverage and false-verdict rates. A draw "
            "without a fit counts as beyond either end. Without episode files only the seeds are resampled (the "
            "method says so); with 2–4 seeds the seeds' share is the spread of the per-seed estimates; with 1 seed "
            "no interval (NOT ENOUGH DATA).",
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
