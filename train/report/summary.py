"""The report's summary: one `Check` row per check (name, figure, estimate, interval, verdict, the sentence
the report states), as a table for the console; and the number formats the report's text shares."""
from __future__ import annotations

import collections
import math
import sys
from typing import Optional, Sequence, TextIO

from emformer.train.report import checks, scaling
from emformer.train.report.result import FIGURES, NOT_IN_SWEEP, Check, ReportResult, Sections


def fmt(value: float, digits: int = 3) -> str:
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}g}"


EM_CHECK = "model vs EM from the same init"
"""the summary row of the check made at every point (replication.py compares it point by point)"""


PASSES_CHECK = "passes against EM iterations"
"""the summary row of a model trained to iterate: err after t passes against EM after t iterations"""


def percent(value: float, digits: int = 2) -> str:
    """A relative figure as a signed percentage ("-0.33%"); n/a when not finite."""
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return f"{100 * value:+.{digits}f}%"


def unfinished_note(incomplete: Sequence[str]) -> str:
    return f" INCONCLUSIVE because these runs of the family did not finish or diverged: {'; '.join(incomplete)}." \
        if incomplete else ""


def unidentified_note(fit: scaling.Interval) -> str:
    return f" ({fit.unidentified})" if fit.unidentified else ""


def size_set(sizes: Sequence[float]) -> str:
    return "{" + ", ".join(str(int(n)) for n in sizes) + "}"


def summary_rows(sections: Sections) -> list[Check]:
    """One row per check (several for the sample complexity: its three estimates and the gap)."""
    sample, depth, heads, separation, beyond = (sections.sample_complexity, sections.depth, sections.heads,
                                                 sections.separation, sections.beyond)
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
                          " / ".join(fmt(fit.estimate, 3) for _, fit in estimates), "see below", "b ≤ −0.5", verdict,
                          f"Sample complexity over N ∈ {size_set(sample.fitted)} (outside the memorisation region "
                          f"{size_set(sample.memorised) if sample.memorised else '(none)'}, excess above "
                          f"{checks.FLOOR_SES:g} paired SE): {verdict} — {reason}.",
                          method=estimates[0][1].label))
        spans = (sample.fitted, sample.upper_fitted, sample.asymptote_sizes)
        for (what, fit), over in zip(estimates, spans):
            part = scaling.verdict(fit, checks.SAMPLE_COMPLEXITY_BOUND) if len(sample.fitted) >= checks.MIN_FITTED_SIZES \
                else scaling.NO_DATA
            rows.append(Check(f"  b from {what}", fig, fmt(fit.estimate, 3), fit.describe(), "b ≤ −0.5", part,
                              f"b from {what} over N ∈ {size_set(over)}: {fmt(fit.estimate, 3)} ({fit.label} "
                              f"{fit.describe()}): {part}{unidentified_note(fit)}.", method=fit.label, fit=fit))
        gap = sample.gap_fit
        rows.append(Check("sample complexity: train/test gap ∝ N^b", fig, fmt(gap.estimate, 3), gap.describe(),
                          "b ≤ −0.5", sample.gap_verdict,
                          f"The train/test gap falls as N^{fmt(gap.estimate, 2)} over N ∈ {size_set(sample.gap_fitted)} "
                          f"({gap.label} {gap.describe()}; needs ≥ {checks.MIN_FITTED_SIZES} N above the fresh run's "
                          f"|gap|): {sample.gap_verdict}.{unfinished_note(sample.incomplete)}", method=gap.label,
                          fit=gap))
    for trends, axis, word in ((depth, "model.depth", "depth L"), (heads, "model.heads", "heads M")):
        if not trends:
            rows.append(Check(f"err against {word}", "—", "—", "—", "falls", NOT_IN_SWEEP,
                              f"The sweep varies no {word} with everything else fixed."))
        for trend in trends:
            rel = trend.relative_fit
            target = f"falls; no effect inside ±{100 * trend.margin:g}% of err per doubling"
            sentence = (f"At {trend.at_n}, {trend.family}: err changes by {fmt(trend.fit.estimate)} per doubling of "
                        f"{word} ({trend.fit.describe(4)}), i.e. {percent(rel.estimate)} of err per doubling "
                        f"({rel.label} [{percent(rel.low)}, {percent(rel.high)}]; margin ±{100 * trend.margin:g}%): "
                        f"{trend.verdict}.{unfinished_note(trend.incomplete)}")
            rows.append(Check(f"err against {word} ({trend.family}), relative change per doubling", FIGURES["depth_heads"],
                              percent(rel.estimate), f"[{percent(rel.low)}, {percent(rel.high)}]" if rel.ok else "n/a",
                              target, trend.verdict, sentence, method=rel.label, fit=rel))
    if not separation:
        rows.append(Check("minimax rate: log err ∝ −Δ²/8", "—", "—", "—", "slope ≤ −0.125", NOT_IN_SWEEP,
                          "The sweep varies no separation Δ with everything else fixed."))
    for trend in separation:
        sentence = (f"{trend.family}: log err falls against Δ² with slope {fmt(trend.fit.estimate)} over Δ ∈ "
                    f"{{{', '.join(fmt(d) for d in trend.fitted)}}} ({trend.fit.label} {trend.fit.describe(3)}; oracle "
                    f"{fmt(trend.oracle_slope)}; theory −1/8 as Δ grows): {trend.verdict}."
                    f"{unfinished_note(trend.incomplete)}")
        rows.append(Check(f"minimax rate: slope of log err vs Δ² ({trend.family})", FIGURES["separation"],
                          fmt(trend.fit.estimate), trend.fit.describe(3), "slope ≤ −0.125", trend.verdict, sentence,
                          method=trend.fit.label, fit=trend.fit))
        ratio = trend.ratio_fit
        rows.append(Check(f"minimax rate: slope of log(err / err_oracle) vs Δ² ({trend.family})", FIGURES["separation"],
                          fmt(ratio.estimate), ratio.describe(4), f"slope ≤ {fmt(checks.RATIO_MARGIN)}",
                          trend.ratio_verdict,
                          f"{trend.family}: log(err / err_oracle) changes against Δ² by {fmt(ratio.estimate)} "
                          f"({ratio.label} {ratio.describe(4)}): {trend.ratio_verdict} (flat: the model keeps the "
                          f"oracle's rate; the check allows a rise up to {fmt(checks.RATIO_MARGIN)}, a quarter of the "
                          f"minimax exponent).{unfinished_note(trend.incomplete)}", method=ratio.label, fit=ratio))
    em = sections.em
    if em:
        counts = collections.Counter(c.verdict for c in em)
        method = em[0].difference.label
        rows.append(Check(f"{EM_CHECK} (every point)", "table",
                          ", ".join(f"{counts[v]} {v}" for v in (checks.BEATS, checks.TIE, checks.LOSES) if counts[v]),
                          "see below", "err − err_EM < 0", "—",
                          f"Against EM from the same init on the same eval episodes, the model "
                          f"{'; '.join(f'{v.lower()} at {counts[v]} of {len(em)} points' for v in (checks.BEATS, checks.TIE, checks.LOSES) if counts[v])} "
                          f"({method}).", method=method))
    for comparison in sections.passes:
        verdicts = [(t, row.verdict) for t, row in zip(comparison.passes, comparison.rows)]
        last = comparison.rows[-1].difference
        said = "; ".join(f"{v.lower()} at t ∈ {{{', '.join(str(t) for t, w in verdicts if w == v)}}}"
                         for v in dict.fromkeys(v for _, v in verdicts))
        # one verdict where every t has the same one (the replication compares it); mixed: the sentence says which
        verdict = verdicts[0][1] if len({v for _, v in verdicts}) == 1 else "—"
        rows.append(Check(f"{PASSES_CHECK} ({comparison.point})", FIGURES["passes"], fmt(last.estimate),
                          last.describe(4), "err − err_EM < 0 at every t", verdict,
                          f"{comparison.point}: after t passes the model, against EM after t iterations from the "
                          f"same init on the same eval episodes, {said} ({last.label}; the figure is err − err_EM "
                          f"at t = {len(verdicts)}).", method=last.label, fit=last))
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


def print_summary(result: ReportResult, file: Optional[TextIO] = None) -> None:
    """The report's path, the runs by state and the summary table on stdout; problems on stderr."""
    file = file or sys.stdout
    states = collections.Counter(run.state for run in result.runs)
    print(f"report: {result.report_path}", file=file)
    print(f"runs: " + ", ".join(f"{n} {s}" for s, n in sorted(states.items())), file=file)
    print(format_summary(result), file=file)
    for problem in result.problems:
        print(f"problem: {problem}", file=sys.stderr)
