"""train/report/replication.py: two replications side by side, and the README block it writes."""
from __future__ import annotations

import pytest

from emformer.errors import ConfigError
from emformer.train.report import replication
from emformer.train.report.resample import Interval
from emformer.train.report.result import Check


def _check(verdict: str, estimate: float, low: float, high: float, name: str = "heads") -> Check:
    fit = Interval(estimate, low, high, "two-level bootstrap", 5, 2000, episodes=4096)
    return Check(name, "f.png", f"{estimate}", f"[{low}, {high}]", "< 0", verdict, "", fit.label, fit)


@pytest.mark.parametrize("second, note", [
    (_check("FALLS", -0.2, -0.3, -0.1), "agree"),
    (_check("INCONCLUSIVE", -0.05, -0.15, 0.05), "disagree; each interval covers the other's estimate"),
    (_check("INCONCLUSIVE", -0.01, -0.012, 0.01), "disagree; one interval covers the other's estimate"),
    (_check("RISES", 0.3, 0.2, 0.4), "**disagree; neither interval covers the other's estimate**"),
])
def test_a_disagreement_says_whether_it_is_inside_the_noise(second, note):
    first = _check("FALLS", -0.1, -0.2, -0.005)
    (row,) = [replication.Comparison("heads", first, second)]
    assert row.note.startswith(note) and row.agree == (note == "agree")


def test_the_block_between_the_markers_is_replaced_and_nothing_else(tmp_path):
    text = f"intro\n{replication.START}\nold\n{replication.END}\nrest\n"
    assert replication.replace_block(text, "new\n", "README.md") == f"intro\n{replication.START}\nnew\n{replication.END}\nrest\n"
    with pytest.raises(ConfigError, match="README.md: no '<!-- replication:start -->'"):
        replication.replace_block("no markers", "new\n", "README.md")


def test_the_model_against_em_is_compared_point_by_point():
    from types import SimpleNamespace

    def result(verdicts: dict[str, str]):
        em = [SimpleNamespace(point=p, verdict=v) for p, v in verdicts.items()]
        check = Check(f"{replication.EM_CHECK} (every point)", "table", "", "see below", "", "—", "")
        return SimpleNamespace(sections=SimpleNamespace(em=em), checks=[check])

    (row,) = replication.compare(result({"a": "BEATS EM", "b": "TIE", "c": "BEATS EM"}),
                                 result({"a": "BEATS EM", "b": "BEATS EM", "d": "TIE"}))
    assert not row.agree and row.note == "the same verdict at 1 of 2 points; not at b (TIE / BEATS EM)"
