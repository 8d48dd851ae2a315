"""config.json's count_head section read as a KPosterior, and refused with a line that names the key."""
from __future__ import annotations

import pytest

from emformer.errors import CheckpointError
from emformer.models.calibration import KPosterior
from emformer.models.export_format import count_posterior


def test_count_head_section_reads_as_the_posterior_and_an_absent_one_as_the_head_alone():
    section = {"temperature": 1.2, "bic_weight": 0.1, "bic_pool": 3.0, "bic_floor": -1.0, "bic_floor_per_log_n": 0.5,
               "fitted_on": {"seed": 1, "episodes": 8}}
    assert count_posterior({"count_head": section}, "c.json") == KPosterior(1.2, 0.1, 3.0, -1.0, 0.5)
    assert count_posterior({}, "c.json") == KPosterior() and not KPosterior().uses_bic
    assert not count_posterior({"count_head": {"temperature": 2.0, "bic_pool": None}}, "c.json").uses_bic


@pytest.mark.parametrize("section, message", [
    ({"temperature": 0.0}, r"c.json: count_head.temperature: expected a finite number > 0, got 0.0"),
    ({"bic_pool": -1}, r"count_head.bic_pool: expected a finite number >= 0"),
    ({"bic_floor": float("nan")}, r"count_head.bic_floor: expected a finite number"),
    ({"bic_weight": "sharp"}, r"count_head.bic_weight: expected a finite number >= 0, got 'sharp'"),
    # the mixture form one earlier emformer wrote: refused, with the command that refits it
    ({"temperature": 0.8, "bic_weight": 0.5, "bic_share": 0.2, "bic_share_per_log_n": 0.1},
     r"count_head.bic_share: P\(k \| X\) in the mixture form .* `emformer export --rescore MODEL_DIR`"),
    ([1, 2], r"'count_head' must be an object"),
])
def test_a_bad_count_head_section_is_one_line_naming_the_key(section, message):
    with pytest.raises(CheckpointError, match=message):
        count_posterior({"count_head": section}, "c.json")
