"""The same episodes on every x86-64 CPU: the sampler's bytes under math-library settings that select the
code paths other CPUs take (MKL's kernel branch, ATen's vector width, numpy's dispatch level, thread count),
each in its own process, against this process's. A vendor routine on the sampling path (MKL's VML log or
sqrt, BLAS, a vectorised reduction) shows up here as a changed digest on any machine."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data import episode_digests

PROBE = Path(episode_digests.__file__)


def _numpy_dispatch_off() -> str:
    """numpy's dispatched SIMD levels that this CPU has, to switch off (numpy then runs its baseline)."""
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

    return ",".join(name for name in __cpu_dispatch__ if __cpu_features__.get(name))


SETTINGS = {  # name -> (environment, torch threads)
    "plain": ({}, 1),
    "mkl-compatible-2-threads": ({"MKL_CBWR": "COMPATIBLE"}, 2),
    "mkl-sse42-aten-scalar": ({"MKL_CBWR": "SSE4_2", "ATEN_CPU_CAPABILITY": "default"}, 1),
    "mkl-avx2-aten-avx2-2-threads": ({"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}, 2),
    "numpy-baseline-aten-scalar": ({"NPY_DISABLE_CPU_FEATURES": "", "ATEN_CPU_CAPABILITY": "default"}, 1),
}


@pytest.fixture(scope="module")
def digests_by_setting() -> dict[str, dict[str, str]]:
    procs = {}
    for name, (extra, threads) in SETTINGS.items():
        env = {**os.environ, **extra}
        if "NPY_DISABLE_CPU_FEATURES" in extra:
            env["NPY_DISABLE_CPU_FEATURES"] = _numpy_dispatch_off()
        procs[name] = subprocess.Popen([sys.executable, str(PROBE), str(threads)], env=env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}: {stderr[-2000:]}"
        out[name] = json.loads(stdout)
    return out


def test_every_setting_gives_the_same_episodes(digests_by_setting):
    here = episode_digests.digests()
    assert set(here) >= set(episode_digests.SPECS) | {"shard", "debug_eval_set"}
    for name, digests in digests_by_setting.items():
        differ = sorted(key for key in here if digests.get(key) != here[key])
        assert not differ, f"{name} {SETTINGS[name]}: other bytes for {differ}"
