"""Run configuration: dataclasses merged with YAML files and `key=value` overrides by OmegaConf.

The schema is the dataclasses below (struct mode: an unknown or mistyped key is an error that names it).
A YAML file may start with a `defaults:` mapping that selects files from config groups, e.g.

    defaults: {task: k3_d8, model: small, strategy: ddp}

and a command-line `group=name` override (no dot, value a file in `configs/<group>/`) does the same, so
`strategy=deepspeed_zero2` merges `configs/strategy/deepspeed_zero2.yaml` into the `strategy` section.
Group files are looked up beside the config file (its nearest ancestor folder with a `task/` or `model/`
folder) and then in the package's configs/ (`group_roots`), so a config copied elsewhere keeps working.
Precedence, lowest first: dataclass defaults < group files < the YAML body < command-line overrides.
This module must stay light (no torch, no lightning): `generate` and `cluster` import it.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from emformer.atomic import atomic_write_text
from emformer.data.config import HELD_OUT_SEEDS, DataConfig, held_out_seeds
from emformer.data.tasks import EPISODES_VERSION, TaskSpec
from emformer.errors import ConfigError
from emformer.models.config import ModelConfig
from emformer.train import extensions

GROUPS = ("task", "model", "data", "optim", "trainer", "strategy", "wandb", "eval")
STRATEGIES = ("auto", "ddp", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    """cosine decay ends at lr * min_lr_ratio at trainer.max_steps"""
    grad_clip: float = 1.0
    """gradient-norm clipping (0 disables)"""


@dataclass
class TrainerConfig:
    max_steps: int = 2000
    val_every: int = 250
    log_every: int = 25
    ckpt_every: int = 250
    accelerator: str = "auto"
    """auto | cpu | gpu"""
    devices: int = 1
    num_nodes: int = 1
    precision: str = "auto"
    """auto (bf16-mixed on GPUs that support it, else 32) | 32 | bf16-mixed | 16-mixed"""
    seed: int = 0
    """seed of the model initialisation"""
    threads: int = 0
    """torch CPU threads per process (0: torch's default)"""
    progress: bool = True
    compile: bool = False
    """torch.compile the model's training forward (see BENCHMARKS.md for what it gains)"""
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    """Lightning callbacks: [{class_path: ..., init_args: {...}}] (train/extensions.py)"""
    loggers: list[dict[str, Any]] = field(default_factory=list)
    """Lightning loggers fed every row of the run: [{class_path: ..., init_args: {...}}] (train/extensions.py)"""
    init_from: Optional[str] = None
    """fine-tuning: the model weights a fresh run starts from (a checkpoint file or DeepSpeed directory, or a
    run dir: its checkpoints/best.ckpt); optimizer, schedule and step start anew; null: random init"""


@dataclass
class StrategyConfig:
    name: str = "ddp"
    """auto | ddp | deepspeed_zero1 | deepspeed_zero2 | deepspeed_zero3"""
    find_unused_parameters: bool = False
    single_process_ddp: bool = False
    """ddp with one process: wrap in DDP with a process group anyway (the 1-GPU NCCL check of gpu_check.sh)"""
    offload_optimizer: bool = False
    """DeepSpeed only: keep optimizer state in CPU memory"""
    param_persistence_threshold: int = 100_000
    """DeepSpeed ZeRO-3 only: parameters with fewer elements stay whole on every rank (0: shard every one)"""


@dataclass
class WandbConfig:
    mode: str = "offline"
    """offline (default, no network) | online (needs a key) | disabled"""
    project: str = "emformer"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    seed: Optional[int] = None
    """seed of the fixed eval set, on which the best checkpoint is selected; null: derived from data.seed
    (data.config.held_out_seeds), so each training seed has its own eval set, shared by every config of that seed"""
    test_seed: Optional[int] = None
    """seed of the test set: what is reported after selection (model card, report --test-shift, the demo);
    null: derived from data.seed like eval.seed"""
    episodes: int = 512
    em_iters: int = 10
    """iterations of the EM and Lloyd baselines"""
    batch_size: int = 256


@dataclass
class RunConfig:
    name: str = "run"
    task: TaskSpec = field(default_factory=TaskSpec)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Sections that do not change what a run computes, so they stay out of its hash and name.
_UNHASHED = ("wandb",)
# How a step runs, not what it computes (compiled or eager kernels, a 1-process DDP wrapper, which parameters
# ZeRO-3 shards): out of the hash too, so adding these keys left every existing run's name and resumability as
# they were.
_UNHASHED_TRAINER = ("progress", "threads", "compile")
_UNHASHED_STRATEGY = ("single_process_ddp", "param_persistence_threshold")
# Keys added after runs were published (the committed study in docs/study) that, at these values, change
# nothing a run computes: left out of the hash at those values, so the names of runs that do not use them
# stay what they were and `emformer study` still skips the committed runs.
_NEUTRAL_AT = {"task": {"d_min": None, "n_log": False, "standardize": False, "diagonal_share": 0.25,
                        "student_t_share": 0.25},
               "model": {"count_head": False, "count_spectrum": False, "passes": 1, "passes_min": None,
                         "grad_passes": None, "tied": False},
               "data": {"buckets": 0}, "trainer": {"init_from": None}}


def neutral_defaults() -> dict[str, Any]:
    """Dotted key -> value of the keys that joined the config after runs were made (_NEUTRAL_AT): a run whose
    config.yaml lacks one ran at this value, as its name (the hash leaves a neutral value out) says."""
    return {f"{section}.{key}": value for section, keys in _NEUTRAL_AT.items() for key, value in keys.items()}


def configs_root(config_path: Path) -> Path:
    """The folder holding config groups beside a file: the nearest ancestor with a `task/` or `model/` dir."""
    for folder in [config_path.parent, *config_path.parent.parents]:
        if (folder / "task").is_dir() or (folder / "model").is_dir():
            return folder
    return config_path.parent


def package_configs() -> Path:
    """The repository's configs/, beside the code (an editable install; a wheel carries none)."""
    return Path(__file__).resolve().parents[1] / "configs"


def group_roots(config_path: Optional[Path]) -> list[tuple[Path, str]]:
    """Where `group=name` and `defaults:` look, in order, each with why: the groups beside the config file
    (./configs without one), then the package's configs/, so a config copied out of configs/ still works."""
    roots = [(configs_root(config_path), "beside the config file") if config_path is not None
             else (Path("configs"), "the working directory's configs")]
    if package_configs().is_dir() and package_configs().resolve() != roots[0][0].resolve():
        roots.append((package_configs(), "the package's configs"))
    return roots


def read_yaml_mapping(path: Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file whose top level is a mapping ({} when empty); ConfigError naming the file otherwise."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level, got {type(data).__name__}")
    return data


def _group_file(roots: Sequence[tuple[Path, str]], group: str, choice: str, where: str) -> Path:
    """The first `<root>/<group>/<choice>.yaml` of `roots`; a ConfigError saying where it looked if none."""
    for root, _ in roots:
        if (root / group / f"{choice}.yaml").is_file():
            return root / group / f"{choice}.yaml"
    looked = []
    for root, why in roots:
        folder = root / group
        found = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
        looked.append(f"{folder} ({why}: " + (f"options {found})" if folder.is_dir() else "no such folder)"))
    raise ConfigError(f"{where}: no config '{choice}' in group '{group}'; looked in {'; '.join(looked)}")


def _merge(base: DictConfig, update: Any, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{where}: {_describe(exc)}") from None


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    message = str(exc).splitlines()[0]
    if "not in struct" in message or "Key '" in message and "not" in message:
        return f"unknown key '{key}'" if key else message
    return f"bad value for '{key}': {message}" if key else message


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), *, finish: bool = True) -> DictConfig:
    """Schema defaults < `defaults:` groups < YAML body < overrides; validated; struct mode.

    `finish=False` stops before the held-out seeds are derived and the result validated: a prefix that
    more overrides will be merged onto (sweep points), which then needs `finish_config`."""
    cfg = OmegaConf.structured(RunConfig)
    OmegaConf.set_struct(cfg, True)
    path = Path(path) if path is not None else None
    roots = group_roots(path)
    body: dict[str, Any] = {}
    if path is not None:
        body = read_yaml_mapping(path)
        defaults = body.pop("defaults", {}) or {}
        if not isinstance(defaults, dict):
            raise ConfigError(f"{path}: 'defaults' must be a mapping like {{task: k3_d8, model: small}}")
        for group, choice in defaults.items():
            if group not in GROUPS:
                raise ConfigError(f"{path}: defaults names unknown group '{group}'; groups are {list(GROUPS)}")
            found = _group_file(roots, group, str(choice), str(path))
            cfg = _merge(cfg, {group: read_yaml_mapping(found)}, str(found))
        cfg = _merge(cfg, body, str(path))
    dotted = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value, e.g. model.depth=4")
        key, value = item.split("=", 1)
        if "." not in key and key in GROUPS and not isinstance(OmegaConf.select(cfg, key), (int, float, str)):
            found = _group_file(roots, key, value, f"override '{item}'")
            cfg = _merge(cfg, {key: read_yaml_mapping(found)}, f"override '{item}'")
        else:
            dotted.append(item)
    if dotted:
        try:
            cli = OmegaConf.from_dotlist(dotted)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"overrides {dotted}: {_describe(exc)}") from None
        cfg = _merge(cfg, cli, "command-line override")
    return finish_config(cfg) if finish else cfg


def finish_config(cfg: DictConfig) -> DictConfig:
    """The last steps of every config: held-out seeds derived from the final data.seed, then validated."""
    resolve_held_out_seeds(cfg)
    validate(cfg)
    return cfg


def resolve_held_out_seeds(cfg: DictConfig) -> DictConfig:
    """Fill eval.seed / eval.test_seed left null with the ones derived from data.seed (in place), so the
    resolved config a run records, and its name, carry the seeds its held-out episodes were drawn with."""
    seed = cfg.data.seed
    if isinstance(seed, int) and 0 <= seed < HELD_OUT_SEEDS:
        eval_seed, test_seed = held_out_seeds(seed)
        if cfg.eval.seed is None:
            cfg.eval.seed = eval_seed
        if cfg.eval.test_seed is None:
            cfg.eval.test_seed = test_seed
    return cfg


def validate(cfg: DictConfig) -> RunConfig:
    """Range checks the type system cannot express, each key checked by its section; each error names its key."""
    run = to_run_config(cfg)
    run.task.validate()
    run.model.validate()
    run.data.validate()

    def need(ok: bool, key: str, expected: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: expected {expected}, got {OmegaConf.select(cfg, key)!r}")

    d, o, t, e = run.data, run.optim, run.trainer, run.eval
    need(o.lr > 0, "optim.lr", "a number > 0")
    need(o.warmup_steps >= 0, "optim.warmup_steps", "an integer >= 0")
    need(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "a number in [0, 1]")
    need(o.grad_clip >= 0, "optim.grad_clip", "a number >= 0")
    need(t.max_steps >= 1, "trainer.max_steps", "an integer >= 1")
    for key in ("val_every", "log_every", "ckpt_every"):
        need(getattr(t, key) >= 1, f"trainer.{key}", "an integer >= 1")
    need(t.accelerator in ("auto", "cpu", "gpu", "cuda"), "trainer.accelerator", "auto, cpu or gpu")
    need(t.devices >= 1, "trainer.devices", "an integer >= 1")
    need(t.num_nodes >= 1, "trainer.num_nodes", "an integer >= 1")
    need(t.precision in ("auto", "32", "bf16-mixed", "16-mixed"), "trainer.precision", "auto, 32, bf16-mixed or 16-mixed")
    extensions.check_specs(t.callbacks, "trainer.callbacks")
    extensions.check_specs(t.loggers, "trainer.loggers")
    need(run.strategy.name in STRATEGIES, "strategy.name", f"one of {', '.join(STRATEGIES)}")
    need(run.strategy.param_persistence_threshold >= 0, "strategy.param_persistence_threshold", "an integer >= 0")
    # Without an init the centroid slots carry no identity, so the loss never reads the head (models/losses.py):
    # its parameters get no gradient, which DDP reports as an error on every rank at the first step.
    need(not run.model.centroid_head or run.task.anchored, "model.centroid_head",
         "false when task.init is none (no init to anchor the refined centroids to, so the head is never trained)")
    need(run.task.noise != "mixed" or d.source == "fresh", "data.source",
         "fresh with task.noise=mixed (pool and shard records hold no per-episode noise mode, which the oracle needs)")
    need(run.wandb.mode in ("offline", "online", "disabled"), "wandb.mode", "offline, online or disabled")
    need(e.episodes >= 1, "eval.episodes", "an integer >= 1")
    need(e.em_iters >= 1, "eval.em_iters", "an integer >= 1")
    held_out = f"a seed >= {HELD_OUT_SEEDS:_} (above every training seed, so its episodes are unseen)"
    need(e.seed is not None and e.seed >= HELD_OUT_SEEDS, "eval.seed", held_out + " or null (derived from data.seed)")
    need(e.test_seed is not None and e.test_seed >= HELD_OUT_SEEDS, "eval.test_seed",
         held_out + " or null (derived from data.seed)")
    need(e.test_seed != e.seed, "eval.test_seed", f"a seed different from eval.seed ({e.seed}) so test episodes are "
         "not the ones the checkpoint was selected on")
    return run


def to_run_config(cfg: DictConfig | dict[str, Any], where: str = "run config") -> RunConfig:
    """The typed run config: the one conversion of a merged DictConfig, or of the plain dict a checkpoint's
    hyper-parameters hold (keys it lacks take today's defaults), into the dataclasses everything below the
    commands takes. Not range-checked here: `validate` does that for new configs."""
    if not isinstance(cfg, DictConfig):
        cfg = _merge(OmegaConf.structured(RunConfig), cfg, where)
    return OmegaConf.to_object(resolve_held_out_seeds(cfg))  # type: ignore[return-value]


def load_run_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """`load_config`, typed: what a command's entry calls once."""
    return to_run_config(load_config(path, overrides))


def to_dict(cfg: DictConfig | RunConfig) -> dict[str, Any]:
    if isinstance(cfg, RunConfig):
        return dataclasses.asdict(cfg)
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def hashed_values(cfg: DictConfig | RunConfig | dict[str, Any]) -> dict[str, Any]:
    """What enters a run's config hash: the config without the keys that do not change what it computes."""
    values = to_dict(cfg) if isinstance(cfg, (DictConfig, RunConfig)) else json.loads(json.dumps(cfg))
    for key in _UNHASHED:
        values.pop(key, None)
    values.pop("name", None)
    for key in _UNHASHED_TRAINER:
        values.get("trainer", {}).pop(key, None)
    trainer = values.get("trainer", {})
    trainer.pop("loggers", None)  # they record a run, they do not change it
    callbacks = extensions.hashed_callbacks(trainer.pop("callbacks", None) or [])
    if callbacks:  # absent when none could change training, so runs without any keep their names
        trainer["callbacks"] = callbacks
    for key in _UNHASHED_STRATEGY:
        values.get("strategy", {}).pop(key, None)
    for section, neutral in _NEUTRAL_AT.items():
        for key, value in neutral.items():
            if key in values.get(section, {}) and values[section][key] == value:
                values[section].pop(key)
    return values


def config_hash(cfg: DictConfig | RunConfig | dict[str, Any]) -> str:
    """8 hex digits identifying what a run computes (wandb and console settings excluded): its config and
    the version of the episodes it trains and evaluates on."""
    values = hashed_values(cfg)
    values["episodes_version"] = EPISODES_VERSION  # same config on other episodes: another run
    blob = json.dumps(values, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def differing_keys(old: DictConfig | RunConfig | dict[str, Any],
                   new: DictConfig | RunConfig | dict[str, Any]) -> list[str]:
    """`key: old -> new` for each hashed key whose value differs (a key one side lacks shows as absent)."""
    def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(tree, dict):
            return {prefix[:-1]: tree}
        return {k: v for key, value in tree.items() for k, v in flat(value, f"{prefix}{key}.").items()}

    a, b = flat(hashed_values(old)), flat(hashed_values(new))
    absent = "(absent)"
    return [f"{key}: {json.dumps(a.get(key, absent))} -> {json.dumps(b.get(key, absent))}"
            for key in sorted(a.keys() | b.keys()) if a.get(key, absent) != b.get(key, absent)]


def run_name(cfg: DictConfig | RunConfig) -> str:
    return f"{cfg.name}-{config_hash(cfg)}"


def save_yaml(cfg: DictConfig | RunConfig, path: Path) -> None:
    """Write the resolved config atomically."""
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.structured(cfg) if isinstance(cfg, RunConfig) else cfg,
                                              resolve=True))


def schema_help() -> str:
    """Every key with its default and help text, for `emformer train --help-config`."""
    lines = []

    def walk(cls: type, prefix: str) -> None:
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.name in GROUPS):
                sub = {"task": TaskSpec, "model": ModelConfig, "data": DataConfig, "optim": OptimConfig,
                       "trainer": TrainerConfig, "strategy": StrategyConfig, "wandb": WandbConfig,
                       "eval": EvalConfig}[f.name]
                walk(sub, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            doc = docs.get(f.name, "")
            lines.append(f"{prefix}{f.name} = {default!r}" + (f"    # {doc}" if doc else ""))

    walk(RunConfig, "")
    return "\n".join(lines)


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string right after a field) as help text."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(getattr(nxt, "value", None), ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
