"""`emformer baselines`: the table, --json, bad input, and no lightning import."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from emformer.train.cli import main

ROOT = Path(__file__).resolve().parents[2]
BASE = str(ROOT / "configs" / "base.yaml")


def test_table_for_two_equal_clusters_shows_closed_form(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["baselines", BASE, "task=k2_d4", "task.n=48", "task.separation=3", "--episodes", "24", "--seed", "5"])
    out = capsys.readouterr().out
    assert code == 0
    for row in ("oracle", "em", "lloyd", "em[kmeans++]", "lloyd[spectral]", "closed form", "EM / oracle err"):
        assert row in out
    assert " ± " in out


def test_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["baselines", BASE, "task=k2_d4", "task.n=40", "task.separation=4", "--episodes", "20", "--json",
                 "--em-iters", "3", "--batch-size", "8"])
    assert code == 0
    table = json.loads(capsys.readouterr().out)
    assert {"em", "lloyd", "oracle", "em[kmeans++]", "lloyd[kmeans++]", "em[spectral]", "lloyd[spectral]"} <= set(table)
    assert table["meta"]["episodes"] == 20 and table["meta"]["em_iters"] == 3
    assert table["oracle"]["closed_form"] == pytest.approx(0.5 * math.erfc(2 / math.sqrt(2)))
    for key in ("err", "err_se", "err_anchored", "ari", "ce"):
        assert 0 <= table["em"][key] < 1 or key == "ce"
    assert "ce" not in table["lloyd"] and "err_anchored" not in table["em[spectral]"]


def test_json_is_deterministic_and_batch_size_free(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["baselines", BASE, "task=k2_d4", "task.k=3", "task.n=30", "--episodes", "12", "--json"]
    main(args + ["--batch-size", "12"])
    first = json.loads(capsys.readouterr().out)
    main(args + ["--batch-size", "5"])
    second = json.loads(capsys.readouterr().out)
    assert "closed_form" not in first["oracle"]  # k = 3: no closed form
    for method in ("oracle", "em", "lloyd", "em[spectral]"):
        assert first[method]["err"] == pytest.approx(second[method]["err"], abs=1e-12)


@pytest.mark.parametrize("args,needle", [
    (["--episodes", "0"], "--episodes"),
    (["task.separation=-1"], "task.separation"),
    (["task.nope=1"], "nope"),
])
def test_bad_input_is_one_clear_error(capsys: pytest.CaptureFixture[str], args: list[str], needle: str) -> None:
    assert main(["baselines", BASE, *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_does_not_import_lightning() -> None:
    code = ("import sys; from emformer.train import baselines_table; "
            "assert 'lightning' not in sys.modules and 'pytorch_lightning' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
