"""Fixtures of the Clusterer tests: a fake run (random weights, instant), its export, and one real tiny
training run per session (shared with tests/train through tests/export_fixtures.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from export_fixtures import make_fake_run, train_tiny_run


@pytest.fixture(scope="session")
def fake_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_run(tmp_path_factory.mktemp("fake-run"))


@pytest.fixture(scope="session")
def fake_export(fake_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from emformer.train.export import export_run

    return export_run(fake_run, tmp_path_factory.mktemp("fake-export") / "model")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_run(tmp_path_factory.getbasetemp() / "tiny-run")


@pytest.fixture(scope="session")
def tiny_export(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run's last checkpoint (the step of its final val row) exported with ONNX, once per session."""
    from emformer.train.export import export_run

    out = tmp_path_factory.getbasetemp() / "tiny-export"
    if not (out / "config.json").is_file():
        export_run(tiny_run, out, onnx=True, which="last")
    return out
