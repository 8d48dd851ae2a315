"""The sweep spec and the sweep directory: a grid of training runs over any config keys, times seeds.

The bottom of the sweep code: the backends (local.py, slurm.py), status.py and the `emformer sweep` command
(command.py) build on it. A sweep spec (configs/sweeps/*.yaml) names a base run config and what to vary:

    name: debug_grid                 # the sweep dir defaults to sweeps/<name>
    base: ../debug.yaml              # relative to the spec file
    overrides: {trainer.max_steps: 100}        # every point
    grid: {model.depth: [1, 2], model.heads: [1, 2]}   # cartesian product, last key fastest
    points: [{model.depth: 4, model.heads: 1}]  # explicit points after the grid
    seeds: [0, 1]                    # seed s sets trainer.seed=s and data.seed=s
    local: {parallel: 2, threads_per_run: 1}
    slurm: {partition: gpu, time: "04:00:00", gpus_per_node: 4, ...}   # see slurm.launcher.SlurmOptions
    wandb: {group: null}             # default: the sweep name

Point ids run seed-major (all of the grid for the first seed, then the next seed), so a partial sweep already
covers the grid. Per point, later wins: overrides < grid/point values < seed < wandb.group.
The sweep dir holds sweep.yaml (the resolved spec), index.json (the points), runs/<run_name>/ per point,
local/ (local launches) and slurm/ (rendered scripts, submissions.json, logs/).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf

from emformer.atomic import atomic_write_text
from emformer.errors import ConfigError
from emformer.slurm.launcher import SlurmOptions
from emformer.train import rundir
from emformer.train.config import GROUPS, config_hash, finish_config, load_config, read_yaml_mapping, run_name

SPEC_KEYS = ("name", "base", "overrides", "grid", "points", "seeds", "local", "slurm", "wandb", "report")
SEED_KEYS = ("trainer.seed", "data.seed")
_MISSING = object()


@dataclass
class LocalOptions:
    parallel: int = 1
    """runs at once"""
    threads_per_run: int = 1
    """OMP/MKL threads of each run"""

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None, where: str) -> "LocalOptions":
        values = dict(values or {})
        unknown = sorted(set(values) - {"parallel", "threads_per_run"})
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown} in 'local'; known: ['parallel', 'threads_per_run']")
        options = cls(**values)
        for key in ("parallel", "threads_per_run"):
            value = getattr(options, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{where}: local.{key}: expected an integer >= 1, got {value!r}")
        return options


@dataclass
class ReportOptions:
    """What the report needs to know of the design that no run records."""

    smallest_effect: float = 0.01
    """the smallest change of err per doubling of depth or heads worth having, as a fraction of the family's
    mean err: inside ± this margin a trend reads NO EFFECT WORTH HAVING (train/report/checks.py)"""

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None, where: str) -> "ReportOptions":
        values = dict(values or {})
        unknown = sorted(set(values) - {"smallest_effect"})
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown} in 'report'; known: ['smallest_effect']")
        effect = values.get("smallest_effect", cls.smallest_effect)
        if not isinstance(effect, (int, float)) or isinstance(effect, bool) or not 0 < effect < 1:
            raise ConfigError(f"{where}: report.smallest_effect: expected a fraction of err in (0, 1), e.g. 0.01, "
                              f"got {effect!r}")
        return cls(float(effect))


@dataclass
class SweepSpec:
    name: str
    base: Path
    """absolute path of the base run config"""
    overrides: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    points: list[dict[str, Any]] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    local: LocalOptions = field(default_factory=LocalOptions)
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    wandb_group: Optional[str] = None
    report: ReportOptions = field(default_factory=ReportOptions)
    source: str = "<spec>"
    """where the spec came from, for error messages"""

    @property
    def group(self) -> str:
        return self.wandb_group or self.name

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec, as written to the sweep dir's sweep.yaml (loadable by `spec_from_dict`)."""
        return {
            "name": self.name,
            "base": str(self.base),
            "overrides": dict(self.overrides),
            "grid": {key: list(values) for key, values in self.grid.items()},
            "points": [dict(point) for point in self.points],
            "seeds": list(self.seeds),
            "local": dataclasses.asdict(self.local),
            "slurm": dataclasses.asdict(self.slurm),
            "wandb": {"group": self.group},
            "report": dataclasses.asdict(self.report),
        }


@dataclass
class Point:
    id: int
    name: str
    """run_name(cfg): <config name>-<hash8>"""
    run_dir: str
    """relative to the sweep dir: runs/<name>"""
    overrides: dict[str, Any]
    """the swept values of this point (grid / explicit point), dotted keys"""
    seed: int
    config: Optional[DictConfig] = None

    def index_entry(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "run_dir": self.run_dir, "overrides": self.overrides,
                "seed": self.seed}


@dataclass
class Sweep:
    """A prepared sweep directory."""

    dir: Path
    spec: SweepSpec
    points: list[Point]

    def run_dir(self, point: Point) -> Path:
        return self.dir / point.run_dir

    def point(self, point_id: int) -> Point:
        for point in self.points:
            if point.id == point_id:
                return point
        raise ConfigError(f"{self.dir}: no point with id {point_id}")


# ---------------------------------------------------------------------------------------------- the spec

def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_cli_overrides(data: dict[str, Any], items: Sequence[str], where: str) -> dict[str, Any]:
    """`key=value` items: run config keys go to `overrides`; `sweep.KEY=value` sets a spec key
    (e.g. sweep.slurm.partition=gpu, sweep.seeds=[0,1], sweep.local.parallel=2)."""
    data = json.loads(json.dumps(data))  # a private copy
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value, e.g. trainer.max_steps=100 "
                              "or sweep.slurm.partition=gpu")
        key, text = item.split("=", 1)
        value = _parse_value(text)
        if key.startswith("sweep."):
            path = key.split(".")[1:]
            if not path or path[0] not in SPEC_KEYS:
                raise ConfigError(f"override '{item}': '{path[0] if path else ''}' is not a sweep spec key; "
                                  f"known: {list(SPEC_KEYS)}")
            node = data
            for part in path[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"override '{item}': sweep.{part} is not a mapping")
            node[path[-1]] = value
        else:
            overrides = data.setdefault("overrides", {}) or {}
            data["overrides"] = overrides
            overrides[key] = value
    return data


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> SweepSpec:
    """Read and check a sweep spec file; `overrides` as in `apply_cli_overrides`."""
    path = Path(path)
    data = read_yaml_mapping(path, what="sweep spec")
    if not data:
        raise ConfigError(f"{path}: expected a mapping with keys {list(SPEC_KEYS)}")
    data = apply_cli_overrides(data, overrides, str(path))
    return spec_from_dict(data, relative_to=path.parent, source=str(path))


def spec_from_dict(data: dict[str, Any], relative_to: Path, source: str, check_base: bool = True) -> SweepSpec:
    where = source
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; a sweep spec has {list(SPEC_KEYS)}")
    name = data.get("name")
    if not isinstance(name, str) or not name or "/" in name or name.strip() != name or " " in name:
        raise ConfigError(f"{where}: name: expected a sweep name without spaces or '/', got {name!r}")
    base = data.get("base")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{where}: base: expected the path of a run config (relative to the spec), got {base!r}")
    base_path = Path(base) if Path(base).is_absolute() else relative_to / base
    if check_base and not base_path.is_file():
        raise ConfigError(f"{where}: base: run config not found: {base_path}")

    overrides = data.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: overrides: expected a mapping of dotted keys, e.g. {{trainer.max_steps: 100}}")
    grid = data.get("grid") or {}
    if not isinstance(grid, dict):
        raise ConfigError(f"{where}: grid: expected a mapping of dotted keys to lists, e.g. {{model.depth: [1, 2]}}")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: grid.{key}: expected a non-empty list of values, got {values!r}")
    points = data.get("points") or []
    if not isinstance(points, list) or not all(isinstance(p, dict) and p for p in points):
        raise ConfigError(f"{where}: points: expected a list of non-empty mappings of dotted keys")
    if not grid and not points:
        raise ConfigError(f"{where}: the sweep is empty: give a non-empty 'grid' and/or 'points'")
    seeds = data.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise ConfigError(f"{where}: seeds: expected a non-empty list of distinct integers >= 0, got {seeds!r}")
    for section, keys in (("overrides", overrides), ("grid", grid), *((f"points[{i}]", p) for i, p in enumerate(points))):
        for key in keys:
            if key in SEED_KEYS:
                raise ConfigError(f"{where}: {section}.{key}: seeds are set by 'seeds:' (seed s sets trainer.seed "
                                  "and data.seed), not by hand")
            if key == "wandb.group":
                raise ConfigError(f"{where}: {section}.{key}: the wandb group is the sweep's: use wandb: {{group: ...}}")
    wandb = data.get("wandb") or {}
    if not isinstance(wandb, dict) or sorted(set(wandb) - {"group"}):
        raise ConfigError(f"{where}: wandb: expected {{group: NAME or null}}, got {wandb!r}")
    group = wandb.get("group")
    if group is not None and not isinstance(group, str):
        raise ConfigError(f"{where}: wandb.group: expected a string or null, got {group!r}")
    return SweepSpec(
        name=name,
        base=base_path.resolve(),
        overrides=dict(overrides),
        grid={str(k): list(v) for k, v in grid.items()},
        points=[dict(p) for p in points],
        seeds=list(seeds),
        local=LocalOptions.from_dict(data.get("local"), where),
        slurm=SlurmOptions.from_dict(data.get("slurm"), where),
        wandb_group=group,
        report=ReportOptions.from_dict(data.get("report"), where),
        source=source,
    )


# -------------------------------------------------------------------------------------------- the points

def _override_item(key: str, value: Any) -> str:
    if "." not in key and key in GROUPS and isinstance(value, str):
        return f"{key}={value}"  # a config group choice, e.g. trainer=gpu
    return f"{key}={json.dumps(value)}"  # JSON is YAML, so OmegaConf reads back the same value


def _check_keys(spec: SweepSpec, base: DictConfig) -> None:
    """Every key the spec sets must be a run config key: name the first one that is not."""
    sections = [("overrides", spec.overrides), ("grid", spec.grid)]
    sections += [(f"points[{i}]", point) for i, point in enumerate(spec.points)]
    for section, keys in sections:
        for key in keys:
            if not isinstance(key, str) or not key:
                raise ConfigError(f"{spec.source}: {section}: keys must be dotted config keys, got {key!r}")
            if "." not in key and key in GROUPS:
                value = keys[key]
                if isinstance(value, dict):
                    raise ConfigError(f"{spec.source}: {section}.{key}: use dotted keys ({key}.x: ...) "
                                      "or a group file name, not a nested mapping")
                continue
            found = OmegaConf.select(base, key, default=_MISSING)
            if found is _MISSING:
                raise ConfigError(f"{spec.source}: {section}: '{key}' is not a key of the run config "
                                  f"(see `emformer train --help-config`)")
            if isinstance(found, DictConfig):
                raise ConfigError(f"{spec.source}: {section}: '{key}' is a section, not a value; "
                                  "name a key inside it")


class _PointLoader:
    """`load_config(base, items)` for many points, fast: building a config from its schema, group files and
    base file dominates the cost of a point (a large sweep spent minutes on it), and most points share
    their group choices. So the config of each distinct list of group choices is built once, and a point's
    dotted items are merged onto it and validated, which is what load_config does after the groups. Any
    failure is redone by load_config itself, for its exact error message."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self._prefixes: dict[tuple[str, ...], DictConfig] = {}

    def load(self, items: Sequence[str]) -> DictConfig:
        groups = tuple(i for i in items if "." not in i.split("=", 1)[0] and i.split("=", 1)[0] in GROUPS)
        dotted = [i for i in items if i not in groups]
        try:
            if groups not in self._prefixes:
                self._prefixes[groups] = load_config(self.base, list(groups), finish=False)
            cfg = OmegaConf.merge(self._prefixes[groups], OmegaConf.from_dotlist(dotted))
            return finish_config(cfg)  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - load_config raises the ConfigError that names the key
            cfg = load_config(self.base, list(items))
            return cfg


def expand_points(spec: SweepSpec) -> list[Point]:
    """Every (grid or explicit point) x seed, each loaded and validated as a run config."""
    base = load_config(spec.base)
    _check_keys(spec, base)
    swept: list[dict[str, Any]] = []
    keys = list(spec.grid)
    if keys:  # product() of no lists is one empty combination: a points-only spec has no base point
        for values in itertools.product(*(spec.grid[key] for key in keys)):
            swept.append(dict(zip(keys, values)))
    swept.extend(dict(point) for point in spec.points)

    # A GPU allocation decides the world size: SLURM starts gpus_per_node tasks on each of `nodes` nodes.
    resources: dict[str, Any] = {}
    if spec.slurm.gpus_per_node > 0:
        resources = {"trainer.devices": spec.slurm.tasks_per_node(1), "trainer.num_nodes": spec.slurm.nodes}

    loader = _PointLoader(spec.base)
    points: list[Point] = []
    seen: dict[str, int] = {}
    for seed in spec.seeds:
        for values in swept:
            point_id = len(points)
            merged = {**resources, **spec.overrides, **values}
            items = [_override_item(k, v) for k, v in merged.items()]
            items += [f"trainer.seed={seed}", f"data.seed={seed}", _override_item("wandb.group", spec.group)]
            try:
                cfg = loader.load(items)
            except ConfigError as exc:
                raise ConfigError(f"{spec.source}: point {point_id} {values or ''} seed {seed}: {exc}") from None
            for key, want in resources.items():
                have = OmegaConf.select(cfg, key)
                if have != want:
                    raise ConfigError(f"{spec.source}: point {point_id}: {key}={have} but the slurm section runs "
                                      f"{want} ({'tasks per node' if key.endswith('devices') else 'nodes'})")
            name = run_name(cfg)
            if name in seen:
                raise ConfigError(f"{spec.source}: points {seen[name]} and {point_id} are the same run ({name}); "
                                  "remove the duplicate")
            seen[name] = point_id
            points.append(Point(point_id, name, f"runs/{name}", values, seed, cfg))
    return points


# ------------------------------------------------------------------------------------------- the sweep dir

def _identity(points: Sequence[Point] | Sequence[dict[str, Any]]) -> list[tuple[int, str]]:
    return [(p.id, p.name) if isinstance(p, Point) else (int(p["id"]), str(p["name"])) for p in points]


def _keep_ids(old: Sequence[dict[str, Any]], points: list[Point]) -> list[Point]:
    """The points of a spec that extends the one which made `old` (every old run still in it, new ones added):
    each old run keeps its id (a SLURM array or a launch record in flight names runs by id), the new runs take
    the ids after them in the spec's order."""
    ids = {str(p["name"]): int(p["id"]) for p in old}
    fresh = itertools.count(max(ids.values(), default=-1) + 1)
    kept = [dataclasses.replace(p, id=ids[p.name] if p.name in ids else next(fresh)) for p in points]
    return sorted(kept, key=lambda p: p.id)


def prepare_sweep(spec: SweepSpec, out: str | Path | None = None) -> Sweep:
    """Create (or re-open) the sweep dir; refuse one that a different spec made. A spec that only adds runs
    to the one that made it (new points or seeds, every old run unchanged) extends it: the old runs keep their
    ids and results, so a committed study grows a family without re-running the rest."""
    points = expand_points(spec)
    sweep_dir = Path(out) if out is not None else Path("sweeps") / spec.name
    if rundir.index_path(sweep_dir).is_file():
        old = rundir.read_index(sweep_dir)
        if _identity(old) != _identity(points):
            old_names = {p["name"] for p in old}
            new_names = {p.name for p in points}
            if old_names - new_names:
                raise ConfigError(
                    f"{sweep_dir} was made by a different sweep spec ({len(new_names - old_names)} new points, "
                    f"{len(old_names - new_names)} missing, e.g. {sorted(old_names - new_names)[:2]}); "
                    "refusing to mix them: choose another --out or remove that directory (a spec that only "
                    "adds points extends a sweep)")
            points = _keep_ids(old, points)
    elif sweep_dir.exists() and any(sweep_dir.iterdir()):
        raise ConfigError(f"{sweep_dir} exists, is not empty and holds no sweep (no index.json): choose another --out")
    for point in points:
        run_dir = sweep_dir / point.run_dir
        if rundir.has_config(run_dir):
            existing = rundir.read_config(run_dir)
            if config_hash(existing) != config_hash(point.config):
                raise ConfigError(f"{rundir.config_path(run_dir)} holds a different config than point {point.id}: refusing to mix")
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            rundir.write_config(run_dir, point.config)
    # base relative to the sweep dir, so a committed or copied sweep (docs/study) names no machine's path
    resolved = {**spec.to_dict(), "base": os.path.relpath(spec.base, Path(sweep_dir).resolve())}
    atomic_write_text(rundir.spec_path(sweep_dir), yaml.safe_dump(resolved, sort_keys=False))
    rundir.write_index(sweep_dir, spec.name, [p.index_entry() for p in points])
    return Sweep(sweep_dir, spec, points)


def load_sweep(sweep_dir: str | Path) -> Sweep:
    """Open an existing sweep dir from its sweep.yaml and index.json (no base config needed)."""
    sweep_dir = Path(sweep_dir)
    if not rundir.spec_path(sweep_dir).is_file() or not rundir.index_path(sweep_dir).is_file():
        raise ConfigError(f"{sweep_dir}: not a sweep directory (expected sweep.yaml and index.json; "
                          "`emformer sweep SPEC --out DIR` makes one)")
    data = yaml.safe_load(rundir.spec_path(sweep_dir).read_text()) or {}
    # The base config may have moved since: every run dir already holds its resolved config.yaml.
    spec = spec_from_dict(data, relative_to=sweep_dir, source=str(rundir.spec_path(sweep_dir)), check_base=False)
    points = [Point(int(p["id"]), str(p["name"]), str(p["run_dir"]), dict(p.get("overrides") or {}), int(p["seed"]))
              for p in rundir.read_index(sweep_dir)]
    return Sweep(sweep_dir, spec, points)
