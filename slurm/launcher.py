"""SLURM at the edges: render the sweep's sbatch script, check the partition, submit, ask for job states.

Everything that talks to SLURM goes through `_slurm_command`, so a missing or failing command becomes one
clear `SlurmError` carrying SLURM's own message. Rendering is pure (golden-tested).
"""
from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from emformer.atomic import atomic_write_json
from emformer.errors import ConfigError, EmformerError

TEMPLATE = Path(__file__).with_name("sweep.sbatch.j2")

# squeue/scontrol states, grouped by what they mean for a point.
ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
                 "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "STOPPED"}
FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                 "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}


class SlurmError(EmformerError):
    """A SLURM command is missing or failed; the message carries SLURM's own words."""


@dataclass
class SlurmOptions:
    """The `slurm:` section of a sweep spec: what goes into the #SBATCH lines and the setup."""

    partition: Optional[str] = None
    """partition (None: the cluster's default)"""
    account: Optional[str] = None
    qos: Optional[str] = None
    time: str = "01:00:00"
    """time limit per task (also needed for --signal to fire)"""
    nodes: int = 1
    gpus_per_node: int = 0
    """GPUs per node; > 0 runs one task per GPU (trainer.devices / num_nodes follow)"""
    ntasks_per_node: Optional[int] = None
    """tasks per node (None: gpus_per_node, or trainer.devices on CPU)"""
    cpus_per_task: int = 2
    mem: Optional[str] = "4G"
    """memory per node, e.g. 64G (None: the cluster's default)"""
    constraint: Optional[str] = None
    array_parallel: int = 4
    """at most this many array tasks at once (the `%` in --array)"""
    extra_sbatch: list[str] = field(default_factory=list)
    """more #SBATCH lines, e.g. ["--exclusive", "--mail-type=FAIL"]"""
    setup: list[str] = field(default_factory=list)
    """shell lines run before training, e.g. ["module load cuda/12.4"]"""
    signal_grace_s: int = 120
    """seconds before the time limit at which USR1 asks the trainer to checkpoint and requeue"""
    python: Optional[str] = None
    """the interpreter that runs `emformer train` (None: the one that submits, i.e. this venv's python;
    set it, e.g. to `python`, when `setup` activates another environment)"""
    job_name: Optional[str] = None
    """None: emformer-<sweep name> (never `bash` or `interactive`: Lightning would treat it as interactive)"""

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None, where: str) -> "SlurmOptions":
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown} in 'slurm'; known: {sorted(known)}")
        options = cls(**values)
        options.validate(where)
        return options

    def validate(self, where: str) -> None:
        def need(ok: bool, key: str, expected: str) -> None:
            if not ok:
                raise ConfigError(f"{where}: slurm.{key}: expected {expected}, got {getattr(self, key)!r}")

        need(isinstance(self.nodes, int) and self.nodes >= 1, "nodes", "an integer >= 1")
        need(isinstance(self.gpus_per_node, int) and self.gpus_per_node >= 0, "gpus_per_node", "an integer >= 0")
        need(self.ntasks_per_node is None or (isinstance(self.ntasks_per_node, int) and self.ntasks_per_node >= 1),
             "ntasks_per_node", "null or an integer >= 1")
        need(isinstance(self.cpus_per_task, int) and self.cpus_per_task >= 1, "cpus_per_task", "an integer >= 1")
        need(isinstance(self.array_parallel, int) and self.array_parallel >= 1, "array_parallel", "an integer >= 1")
        need(isinstance(self.signal_grace_s, int) and self.signal_grace_s >= 1, "signal_grace_s", "an integer >= 1")
        need(isinstance(self.time, str) and bool(re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", self.time)), "time",
             "a SLURM time like 01:00:00 or 2-00:00:00 (quoted in YAML)")
        need(isinstance(self.extra_sbatch, list) and all(isinstance(x, str) for x in self.extra_sbatch),
             "extra_sbatch", "a list of strings like '--exclusive'")
        need(isinstance(self.setup, list) and all(isinstance(x, str) for x in self.setup), "setup",
             "a list of shell lines")
        need(self.python is None or (isinstance(self.python, str) and self.python.strip() != ""), "python",
             "null (the submitting python) or an interpreter path/name")
        need(self.partition is None or (isinstance(self.partition, str) and self.partition.strip() != ""),
             "partition", "null (the cluster default) or a partition name")
        name = self.job_name
        need(name is None or (isinstance(name, str) and name not in ("bash", "interactive") and name.strip() == name
                              and " " not in name and name != ""), "job_name",
             "a name without spaces other than 'bash' or 'interactive'")

    def tasks_per_node(self, devices: int) -> int:
        if self.ntasks_per_node is not None:
            return self.ntasks_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else devices


def array_expression(ids: Iterable[int], parallel: int | None = None) -> str:
    """`[0,1,2,5,7,8]` -> `0-2,5,7-8` (+ `%parallel`)."""
    ordered = sorted(set(ids))
    if not ordered:
        raise ValueError("an array needs at least one task id")
    parts: list[str] = []
    start = prev = ordered[0]
    for i in ordered[1:] + [None]:  # type: ignore[list-item]
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    expression = ",".join(parts)
    return f"{expression}%{parallel}" if parallel else expression


def parse_array_ids(expression: str) -> list[int]:
    """Inverse of array_expression, also for scontrol's `1-3%2` and `0-6:2`."""
    expression = expression.split("%", 1)[0]
    ids: list[int] = []
    for part in filter(None, expression.split(",")):
        step = 1
        if ":" in part:
            part, step_text = part.split(":", 1)
            step = int(step_text)
        if "-" in part:
            lo, hi = part.split("-", 1)
            ids.extend(range(int(lo), int(hi) + 1, step))
        else:
            ids.append(int(part))
    return ids


def render_script(
    options: SlurmOptions,
    *,
    sweep_name: str,
    sweep_dir: Path,
    run_dirs: Sequence[tuple[int, str]],
    ids: Sequence[int],
    workdir: Path,
    devices: int = 1,
    script_name: str = "sweep.sbatch",
    python: str | None = None,
) -> str:
    """The sbatch script for array tasks `ids` (point ids); `run_dirs` maps every id to its run dir.
    `python` (default: options.python, else the interpreter running this) must be valid on the compute nodes."""
    import jinja2

    env = jinja2.Environment(keep_trailing_newline=True, undefined=jinja2.StrictUndefined, autoescape=False)
    env.filters["q"] = lambda value: shlex.quote(str(value))
    template = env.from_string(TEMPLATE.read_text())
    return template.render(
        sweep_name=sweep_name,
        script_name=script_name,
        job_name=options.job_name or f"emformer-{sweep_name}",
        partition=options.partition,
        account=options.account,
        qos=options.qos,
        time=options.time,
        nodes=options.nodes,
        ntasks_per_node=options.tasks_per_node(devices),
        gpus_per_node=options.gpus_per_node,
        cpus_per_task=options.cpus_per_task,
        mem=options.mem,
        constraint=options.constraint,
        array=array_expression(ids, min(options.array_parallel, len(set(ids)))),
        workdir=workdir,
        log_dir=sweep_dir / "slurm" / "logs",
        signal_grace_s=options.signal_grace_s,
        extra_sbatch=[line.removeprefix("#SBATCH").strip() for line in options.extra_sbatch],
        setup=options.setup,
        sweep_dir=sweep_dir,
        run_dirs=sorted(run_dirs),
        python=python or options.python or sys.executable,
    )


def _slurm_command(argv: Sequence[str], what: str, timeout: float = 60.0) -> str:
    """Run a SLURM client command; its stdout, or a SlurmError with its stderr."""
    if shutil.which(argv[0]) is None:
        raise SlurmError(f"{what}: '{argv[0]}' not found on PATH: is SLURM installed here? "
                         f"(slurm/local-cluster/up.sh starts a local one; --dry-run needs none)")
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{what}: `{shlex.join(argv)}` did not answer in {timeout:.0f} s") from None
    if done.returncode != 0:
        message = (done.stderr.strip() or done.stdout.strip() or "(no message)").splitlines()
        raise SlurmError(f"{what}: `{shlex.join(argv)}` failed (exit {done.returncode}): {' | '.join(message[-5:])}")
    return done.stdout


def partitions() -> list[str]:
    """Partition names this cluster knows (the default one is marked `*` by sinfo; stripped)."""
    out = _slurm_command(["sinfo", "-h", "-o", "%P"], "listing partitions")
    return sorted({line.strip().rstrip("*") for line in out.splitlines() if line.strip()})


def check_partition(partition: str | None) -> None:
    if partition is None:
        return
    known = partitions()
    if partition not in known:
        raise ConfigError(f"slurm.partition: partition '{partition}' does not exist on this cluster; "
                          f"sinfo lists {known}")


def submit(script: Path) -> str:
    """`sbatch --parsable SCRIPT` -> job id (the array's job id)."""
    out = _slurm_command(["sbatch", "--parsable", str(script)], f"submitting {script}")
    job_id = out.strip().splitlines()[-1].split(";", 1)[0] if out.strip() else ""
    if not job_id.isdigit():
        raise SlurmError(f"submitting {script}: sbatch printed no job id: {out.strip()!r}")
    return job_id


@dataclass
class TaskState:
    """What slurmctld says about one array task."""

    job_id: str
    """`<array job>_<task>`"""
    state: str
    """PENDING, RUNNING, COMPLETED, FAILED, ... (scontrol's JobState)"""
    restarts: int = 0
    reason: str = ""
    exit_code: str = ""

    @property
    def requeued(self) -> bool:
        return self.state.startswith("REQUEUE") or (self.state == "PENDING" and self.restarts > 0)


def _parse_scontrol_line(line: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for token in line.split():
        key, sep, value = token.partition("=")
        if sep and key not in fields:
            fields[key] = value
    return fields


def array_task_states(array_job_ids: Iterable[str]) -> dict[str, TaskState] | None:
    """`{"<array job>_<task>": TaskState}` for every task slurmctld still knows; None if SLURM is absent.

    Uses `scontrol -o show job` (no accounting needed): it also reports finished tasks for MinJobAge
    (300 s by default); older ones are simply missing and the caller falls back to the run dir.
    """
    if shutil.which("scontrol") is None:
        return None
    states: dict[str, TaskState] = {}
    for array_job in sorted(set(array_job_ids)):
        done = subprocess.run(["scontrol", "-o", "show", "job", array_job], capture_output=True, text=True,
                              timeout=60)
        if done.returncode != 0:
            if "Invalid job id" in done.stderr or "Invalid job id" in done.stdout:
                continue  # purged: finished long ago
            return None  # slurmctld unreachable: say unknown rather than guess
        for line in done.stdout.splitlines():
            fields = _parse_scontrol_line(line)
            if fields.get("ArrayJobId") != array_job or "ArrayTaskId" not in fields:
                continue
            for task in parse_array_ids(fields["ArrayTaskId"]):
                states[f"{array_job}_{task}"] = TaskState(
                    job_id=f"{array_job}_{task}",
                    state=fields.get("JobState", "UNKNOWN"),
                    restarts=int(fields.get("Restarts", "0") or 0),
                    reason=fields.get("Reason", ""),
                    exit_code=fields.get("ExitCode", ""),
                )
    return states


# Submission records: <sweep dir>/slurm/submissions.json, one entry per sbatch, newest last. Each holds the
# job id, the array expression, the point id -> run dir mapping and the script, so any submission can be
# repeated by hand (`sbatch <script>`) and `emformer status` knows which job ran which point.
def submissions_path(sweep_dir: Path) -> Path:
    return Path(sweep_dir) / "slurm" / "submissions.json"


def read_submissions(sweep_dir: Path) -> list[dict[str, Any]]:
    path = submissions_path(sweep_dir)
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text())["submissions"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SlurmError(f"{path}: unreadable submission records: {exc}") from None


def record_submission(sweep_dir: Path, record: dict[str, Any]) -> None:
    records = read_submissions(sweep_dir) + [record]
    atomic_write_json(submissions_path(sweep_dir), {"submissions": records})
