"""Every shipped config file resolves against the schema (litgpt-style): a typo in configs/ fails here."""
from pathlib import Path

import pytest
import yaml

from emformer.train.config import GROUPS, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RUN_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml"))
GROUP_FILES = sorted(p for g in GROUPS for p in (CONFIGS / g).glob("*.yaml"))


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_run_config_resolves(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.name


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_group_file_resolves(path: Path) -> None:
    cfg = load_config(CONFIGS / "base.yaml", [f"{path.parent.name}={path.stem}"])
    section = cfg[path.parent.name]
    for key, value in (yaml.safe_load(path.read_text()) or {}).items():
        assert section[key] == value


def test_shipped_groups_exist() -> None:
    assert RUN_CONFIGS and GROUP_FILES
    assert {"base.yaml", "debug.yaml", "reference.yaml"} <= {p.name for p in RUN_CONFIGS}
