"""Configs: every shipped file resolves against the schema (litgpt-style: a typo in configs/ fails here), the
precedence of groups, body and overrides, errors that name the key, and the run hash."""
from pathlib import Path

import pytest
import yaml

from emformer.errors import ConfigError
from emformer.train.config import GROUPS, config_hash, load_config, run_name, save_yaml, schema_help, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RUN_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml"))
GROUP_FILES = sorted(p for g in GROUPS for p in (CONFIGS / g).glob("*.yaml"))


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_run_config_resolves(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.name == yaml.safe_load(path.read_text())["name"]  # its own name, not the schema's default


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_group_file_resolves(path: Path) -> None:
    cfg = load_config(CONFIGS / "base.yaml", [f"{path.parent.name}={path.stem}"])
    section = cfg[path.parent.name]
    for key, value in (yaml.safe_load(path.read_text()) or {}).items():
        assert section[key] == value


def test_shipped_groups_exist() -> None:
    assert RUN_CONFIGS and GROUP_FILES
    assert {"base.yaml", "debug.yaml", "reference.yaml"} <= {p.name for p in RUN_CONFIGS}


# ------------------------------------------------------------------------------- loading and overrides

DEBUG = CONFIGS / "debug.yaml"


def test_precedence_defaults_groups_body_overrides() -> None:
    cfg = load_config(DEBUG)
    assert cfg.task.k == 2 and cfg.task.n == 32  # group task/k2_d4 (k), then the body (n: 32 over 64)
    assert cfg.model.width == 32 and cfg.optim.beta2 == 0.95  # group model/tiny; schema default
    cfg = load_config(DEBUG, ["model.depth=4", "task.k=3", "task.n=48", "strategy=deepspeed_zero2"])
    assert (cfg.model.depth, cfg.task.k, cfg.task.n, cfg.strategy.name) == (4, 3, 48, "deepspeed_zero2")
    assert load_config(DEBUG, ["wandb.tags=[a,b]"]).wandb.tags == ["a", "b"]


@pytest.mark.parametrize("overrides, message", [
    (["model.depht=3"], "unknown key 'model.depht'"),
    (["modle.depth=3"], "modle"),
    (["model.depth=three"], "model.depth"),
    (["model.depth"], "expected key=value"),
    (["model.depth=0"], "model.depth: expected an integer >= 1"),
    (["task=k9_d9"], "no config 'k9_d9' in group 'task'"),
    (["data.source=pool"], "data.pool_size: expected an integer >= 1 when data.source=pool"),
    (["wandb.mode=on"], "wandb.mode: expected offline, online or disabled"),
])
def test_bad_overrides_name_the_key(overrides, message) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(DEBUG, overrides)
    assert message in str(info.value)


def test_bad_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("model:\n  depth: 2\n  widht: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'model.widht'"):
        load_config(bad)
    bad.write_text("defaults: {optimizer: adam}\n")
    with pytest.raises(ConfigError, match="unknown group 'optimizer'"):
        load_config(bad)


def test_hash_and_name_ignore_what_does_not_change_the_computation() -> None:
    base = load_config(DEBUG)
    assert config_hash(base) == config_hash(load_config(DEBUG, ["wandb.mode=disabled", "trainer.progress=false",
                                                                "trainer.threads=1", "name=other"]))
    assert config_hash(base) != config_hash(load_config(DEBUG, ["model.depth=3"]))
    assert config_hash(base) == config_hash(to_dict(base))  # dict and DictConfig hash alike
    assert run_name(base) == f"debug-{config_hash(base)}"


def test_run_names_change_with_the_episodes_version(monkeypatch) -> None:
    """Runs trained on older episodes are other runs: a sweep reruns them instead of resuming or skipping."""
    import emformer.train.config as config

    base = load_config(DEBUG)
    current = config_hash(base)
    monkeypatch.setattr(config, "EPISODES_VERSION", config.EPISODES_VERSION + 1)
    assert config_hash(base) != current


def test_saved_config_reloads_to_the_same_run(tmp_path) -> None:
    cfg = load_config(DEBUG, ["model.depth=3", "task.k=3"])
    save_yaml(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)


def test_schema_help_lists_every_key_with_its_help() -> None:
    text = schema_help()
    for key in ("task.k = 3", "model.depth = 4", "data.source = 'fresh'", "optim.warmup_steps",
                "trainer.val_every", "strategy.name", "wandb.mode = 'offline'", "eval.em_iters"):
        assert key in text
    assert "D: residual stream width" in text
