"""A real SLURM for the tests marked `slurm`, started once per session by the project's own
slurm/local-cluster/up.sh with 2 nodes on this host (n1, n2) and stopped by down.sh at the end (only if this
session started it). A SLURM that already answers is used as it is (the 2-node tests skip on one node).

The tests run when the machine allows it: SLURM already answering, or root with the daemons installed or
apt-get to install them. Otherwise they are skipped with the reason, so `make test` says why."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCAL_CLUSTER = REPO / "slurm" / "local-cluster"
UP_TIMEOUT_S = 600  # a first start installs packages (seconds with a local mirror, minutes without)
NODES = 2  # the most any test asks for: a 2-node job


def _answers() -> bool:
    """A SLURM controller answers this machine's client commands already."""
    if shutil.which("scontrol") is None or shutil.which("sbatch") is None:
        return False
    try:
        done = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and "UP" in done.stdout


def _why_not_startable() -> str | None:
    if os.environ.get("EMFORMER_SKIP_SLURM"):
        return "EMFORMER_SKIP_SLURM is set"
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not root: slurm/local-cluster/up.sh must install and start munge + slurm as root " \
               "(or start a SLURM here first)"
    have_daemons = all(shutil.which(cmd) for cmd in ("slurmctld", "slurmd", "sbatch", "munged"))
    if not have_daemons and shutil.which("apt-get") is None:
        return "SLURM is not installed and there is no apt-get to install it"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[str]:
    """The default partition of a running SLURM; started with up.sh (and stopped at the end) if needed."""
    started = False
    if not _answers():
        reason = _why_not_startable()
        if reason:
            pytest.skip(f"no SLURM for the slurm tests: {reason}")
        # --fresh: a controller saved by a session killed mid-job would bring that job back, holding the nodes.
        done = subprocess.run(["bash", str(LOCAL_CLUSTER / "up.sh"), "--nodes", str(NODES), "--fresh"],
                              capture_output=True, text=True, timeout=UP_TIMEOUT_S)
        if done.returncode == 3:
            pytest.skip(f"no SLURM for the slurm tests: up.sh cannot install it here: {done.stderr.strip()}")
        if done.returncode != 0:
            # Root with apt but the cluster does not come up: a real failure, not a skip.
            pytest.fail(f"slurm/local-cluster/up.sh failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
        started = True
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, check=True).stdout
    default = next((p.rstrip("*") for p in out.split() if p.endswith("*")), out.split()[0].rstrip("*"))
    yield default
    if started:
        subprocess.run(["bash", str(LOCAL_CLUSTER / "down.sh")], capture_output=True, text=True, timeout=120)
