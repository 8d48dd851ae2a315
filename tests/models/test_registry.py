"""The shipped models by name: pretrained/<name>/ (package data when installed)."""
from __future__ import annotations

from pathlib import Path

import pytest

from emformer import Clusterer
from emformer.errors import CheckpointError
from emformer.models.registry import pretrained_root, resolve_model_dir, shipped_models


def test_a_shipped_model_resolves_by_name() -> None:
    assert "emformer-gmm-small" in shipped_models()
    assert resolve_model_dir("emformer-gmm-small") == pretrained_root() / "emformer-gmm-small"


def test_unknown_model_name_lists_the_shipped_ones() -> None:
    with pytest.raises(CheckpointError, match="no-such-model: no such export directory and no shipped model"
                                              ".*emformer-gmm-small"):
        Clusterer.from_pretrained("no-such-model")
    assert resolve_model_dir("some/dir/that/is/not/a/name") == Path("some/dir/that/is/not/a/name")
