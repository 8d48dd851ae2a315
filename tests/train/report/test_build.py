"""Building the report: what it reads and refuses (the checks on fabricated sweeps are in test_command.py)."""
from __future__ import annotations

import pytest

from emformer.errors import ConfigError
from emformer.train.report import build as report
from tests.train.report.test_command import make_run


def test_a_run_directory_is_refused_with_what_report_needs(tmp_path, capsys):
    """One run's directory (config.yaml, no runs inside) is not a sweep: exit 2 with a one-line reason."""
    from emformer.train.cli import main

    run = make_run(tmp_path / "runs", ["data.source=fresh"], 0)
    with pytest.raises(ConfigError, match="one run's directory .* needs a sweep directory"):
        report.build_report(run, tmp_path / "out")
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "needs a sweep directory" in err
    assert not (run / "report").exists() and not (run / "wandb").exists()
