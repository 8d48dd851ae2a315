"""`emformer export`: files and config.json, round trips (torch, onnxruntime), sources (run dir, checkpoint
file, DeepSpeed directory) and every bad source."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from emformer.errors import CheckpointError, ConfigError
from emformer.models.clusterer import Clusterer, sha256_file
from emformer.models.transformer import ClusterTransformer, TransformerConfig
from emformer.train import export as export_mod
from emformer.train.cli import main
from emformer.train.export import export_checkpoint, export_run, load_checkpoint
from export_fixtures import FAKE_STEP, FAKE_VAL_ROW, REPO, make_fake_run, subprocess_env


def _random_inputs(cfg: TransformerConfig, batch: int, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    points = torch.randn(batch, n, cfg.d_in, generator=gen) * 2
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[-1, n // 2:] = False
    init = torch.randn(batch, cfg.k_max, cfg.d_in, generator=gen) * 2
    return points, mask, init, torch.ones(batch, cfg.k_max, dtype=torch.bool)


def _model_from_checkpoint(path: Path) -> ClusterTransformer:
    """The training checkpoint's model, rebuilt the way training does (hyper_parameters + state_dict)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = ClusterTransformer(TransformerConfig.from_run_config(checkpoint["hyper_parameters"]["config"]))
    model.load_state_dict({k[len("model."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")})
    return model.eval()


# ------------------------------------------------------------------------------------------- format
def test_export_writes_the_documented_files(fake_run: Path, fake_export: Path) -> None:
    names = sorted(p.name for p in fake_export.iterdir())
    assert names == ["README.md", "config.json", "model.safetensors"]  # no temp files left behind
    config = json.loads((fake_export / "config.json").read_text())
    run_config = torch.load(fake_run / "checkpoints/best.ckpt", weights_only=True)["hyper_parameters"]["config"]
    assert config["format"] == "emformer-export" and config["format_version"] == 1
    assert config["architecture"] == TransformerConfig.from_run_config(run_config).to_dict()
    assert config["task"] == run_config["task"]
    task = run_config["task"]
    assert config["supported"]["k"]["max"] == config["architecture"]["k_max"] == task["k"]
    assert config["supported"]["d"]["max"] == config["architecture"]["d_in"] == task["d"]
    assert config["supported"]["n"]["trained"] == [task["n"], task["n"]]
    assert config["training"]["commit"] == "0123abcd" and config["training"]["step"] == FAKE_STEP
    assert config["eval"]["err_em"] == FAKE_VAL_ROW["err_em"]
    assert config["files"]["model.safetensors"]["sha256"] == sha256_file(fake_export / "model.safetensors")
    assert 0.5 < config["input_scale"] < 3
    card = (fake_export / "README.md").read_text()
    for figure in ("0.1010", "0.0810", "0.0710", "Model error / oracle error: 1.42"):
        assert figure in card
    mode = stat.S_IMODE(os.stat(fake_export / "model.safetensors").st_mode)
    assert mode & stat.S_IRGRP  # shareable, not mkstemp's 0600


def test_export_then_load_gives_the_checkpoint_outputs(fake_run: Path, fake_export: Path) -> None:
    reference = _model_from_checkpoint(fake_run / "checkpoints/best.ckpt")
    clusterer = Clusterer.from_pretrained(fake_export)
    for n in (5, 32, 200):
        inputs = _random_inputs(reference.cfg, 2, n, seed=n)
        with torch.inference_mode():
            assert torch.equal(clusterer.model(*inputs), reference(*inputs))


def test_cli_export_last_from_checkpoint_file_and_flags(fake_run: Path, tmp_path: Path, capsys) -> None:
    assert main(["export", str(fake_run), "--out", str(tmp_path / "a"), "--last"]) == 0
    assert "last.ckpt" in json.loads((tmp_path / "a/config.json").read_text())["training"]["checkpoint"]
    assert main(["export", str(fake_run / "checkpoints/best.ckpt"), "--out", str(tmp_path / "b")]) == 0
    config = json.loads((tmp_path / "b/config.json").read_text())
    assert config["eval"]["step"] == FAKE_STEP  # the run dir was found from the checkpoint's path
    assert main(["export", str(fake_run / "checkpoints/best.ckpt"), "--out", str(tmp_path / "c"), "--best"]) == 2
    assert "--best: only applies to a run directory" in capsys.readouterr().err


def test_export_checkpoint_without_run_dir(fake_run: Path, tmp_path: Path) -> None:
    lone = tmp_path / "lone.ckpt"
    lone.write_bytes((fake_run / "checkpoints/best.ckpt").read_bytes())
    out = export_checkpoint(lone, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["eval"] is None and config["training"]["commit"] is None
    assert "No val row" in (out / "README.md").read_text()
    Clusterer.from_pretrained(out)


# ------------------------------------------------------------------------------------------- bad sources
def test_missing_run_dir_and_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such run directory"):
        export_run(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "run/checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"best.ckpt: missing \(checkpoints present: none\)"):
        export_run(tmp_path / "run", tmp_path / "out")
    with pytest.raises(ConfigError, match="which"):
        export_run(tmp_path / "run", tmp_path / "out", which="middle")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        export_checkpoint(tmp_path / "nope.ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupt_and_foreign_checkpoints(tmp_path: Path, fake_run: Path) -> None:
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.ckpt: not a readable torch checkpoint"):
        load_checkpoint(garbage)
    no_config = tmp_path / "no_config.ckpt"
    checkpoint = torch.load(fake_run / "checkpoints/best.ckpt", weights_only=True)
    torch.save({"state_dict": checkpoint["state_dict"], "hyper_parameters": {}}, no_config)
    with pytest.raises(CheckpointError, match=r"hyper_parameters\['config'\] is missing"):
        load_checkpoint(no_config)
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "thing": Path("x")}, pickled)
    with pytest.raises(CheckpointError, match="refused for safety"):
        load_checkpoint(pickled)


def test_weights_that_do_not_fit_the_config_are_named(tmp_path: Path, fake_run: Path) -> None:
    checkpoint = torch.load(fake_run / "checkpoints/best.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["config"]["model"]["width"] = 64
    bad = tmp_path / "bad.ckpt"
    torch.save(checkpoint, bad)
    with pytest.raises(CheckpointError, match=r"shape mismatch in \d+ tensor\(s\): blocks.0.attn.proj.bias: file \(32,\), architecture \(64,\)"):
        export_checkpoint(bad, tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()


def test_cli_error_is_one_line(tmp_path: Path, capsys) -> None:
    assert main(["export", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("emformer export: error:") and "\n" not in err


# ------------------------------------------------------------------------------------------- ONNX
@pytest.fixture(scope="module")
def onnx_export(fake_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_run(fake_run, tmp_path_factory.mktemp("onnx") / "model", onnx=True)


@pytest.mark.slow
def test_onnx_matches_torch_at_several_n_and_batch(onnx_export: Path, fake_run: Path) -> None:
    import onnxruntime

    config = json.loads((onnx_export / "config.json").read_text())
    assert config["onnx"]["max_abs_diff"] < 1e-4 and config["onnx"]["dynamic"] == ["B", "n"]
    assert config["files"]["model.onnx"]["sha256"] == sha256_file(onnx_export / "model.onnx")
    reference = _model_from_checkpoint(fake_run / "checkpoints/best.ckpt")
    session = onnxruntime.InferenceSession(str(onnx_export / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch, n in ((1, 17), (4, 64), (2, 300), (1, 3)):
        inputs = _random_inputs(reference.cfg, batch, n, seed=batch * n)
        with torch.inference_mode():
            expected = reference(*inputs).numpy()
        (got,) = session.run(None, dict(zip(("points", "mask", "init", "kmask"), (t.numpy() for t in inputs))))
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_onnx_mismatch_is_an_error_and_writes_nothing(onnx_export: Path, tmp_path: Path) -> None:
    """Check the exported graph against a model with other weights: the verifier must refuse it."""
    config = json.loads((onnx_export / "config.json").read_text())
    architecture = TransformerConfig.from_dict(config["architecture"])
    torch.manual_seed(123)
    other = export_mod._LogitsOnly(ClusterTransformer(architecture)).eval()
    with pytest.raises(CheckpointError, match="ONNX logits differ from torch"):
        export_mod._check_onnx(other, architecture, (onnx_export / "model.onnx").read_bytes(), tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.slow
def test_reexport_without_onnx_removes_stale_onnx(fake_run: Path, onnx_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "model.onnx").write_bytes((onnx_export / "model.onnx").read_bytes())
    export_run(fake_run, out)
    assert not (out / "model.onnx").exists()


# ------------------------------------------------------------------------------------------- real runs
@pytest.mark.slow
def test_trained_run_export_matches_checkpoint_in_torch_and_onnx(tiny_run: Path, tiny_export: Path) -> None:
    import onnxruntime

    reference = _model_from_checkpoint(tiny_run / "checkpoints/last.ckpt")
    clusterer = Clusterer.from_pretrained(tiny_export)
    session = onnxruntime.InferenceSession(str(tiny_export / "model.onnx"), providers=["CPUExecutionProvider"])
    for n in (17, 64, 300):
        inputs = _random_inputs(reference.cfg, 2, n, seed=n)
        with torch.inference_mode():
            expected = reference(*inputs)
            assert torch.equal(clusterer.model(*inputs), expected)
        (got,) = session.run(None, dict(zip(("points", "mask", "init", "kmask"), (t.numpy() for t in inputs))))
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=1e-4)
    config = json.loads((tiny_export / "config.json").read_text())
    done = json.loads((tiny_run / "DONE").read_text())
    assert config["eval"]["err"] == done["val"]["err"] and config["eval"]["step"] == done["val"]["step"]
    meta = json.loads((tiny_run / "meta.json").read_text())
    assert config["training"]["commit"] == meta["git_commit"]


DEEPSPEED_SCRIPT = r"""
import json, sys
from pathlib import Path
import torch, deepspeed
from deepspeed.comm.torch import TorchBackend
from emformer.models.transformer import ClusterTransformer, TransformerConfig

run_dir, stage = Path(sys.argv[1]), int(sys.argv[2])
config = torch.load(run_dir / "checkpoints/best.ckpt", weights_only=True)["hyper_parameters"]["config"]


class Module(torch.nn.Module):  # the LightningModule's layout: the transformer under `model.`
    def __init__(self):
        super().__init__()
        self.model = ClusterTransformer(TransformerConfig.from_run_config(config))


import deepspeed.comm.torch as ds_torch
ds_torch.build_shm_op = lambda: None  # the CPU backend would compile a shared-memory op (~20 s); gloo needs none
deepspeed.init_distributed(dist_backend="gloo")
module = Module()
engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(), optimizer=torch.optim.AdamW(module.parameters(), lr=1e-2),
    config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True})
points = torch.randn(4, 16, 4); mask = torch.ones(4, 16, dtype=torch.bool); init = torch.randn(4, 2, 4); kmask = torch.ones(4, 2, dtype=torch.bool)
for _ in range(2):  # move the weights away from the fake run's so the test sees the consolidated ones
    loss = engine.module.model(points, mask, init, kmask).logsumexp(-1).mean()
    engine.backward(loss); engine.step()
client = {"hyper_parameters": {"config": config}, "global_step": 2, "epoch": 0}
target = run_dir / "checkpoints" / "last.ckpt"
engine.save_checkpoint(str(target), client_state=client, tag="checkpoint")
if torch.distributed.get_rank() == 0:
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        state = {k: v.detach().clone() for k, v in engine.module.model.state_dict().items()}
    torch.save(state, run_dir / "expected.pt")
elif stage == 3:
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        pass
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_checkpoint_exports(stage: int, tmp_path: Path) -> None:
    """A ZeRO-2/3 checkpoint directory written by two CPU ranks (gloo) in the layout Lightning's
    DeepSpeedStrategy uses (tag "checkpoint", client state beside the module states) exports to the
    consolidated fp32 weights."""
    pytest.importorskip("deepspeed")
    script = tmp_path / "make_ds.py"
    script.write_text(DEEPSPEED_SCRIPT)
    run_dir = make_fake_run(tmp_path / "run")
    (run_dir / "checkpoints/last.ckpt").unlink()  # DeepSpeed writes a directory in its place
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env.get("PYTHONPATH", "")])
    env["DS_ACCELERATOR"] = "cpu"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(29500 + stage + os.getpid() % 1000),
               str(script), str(run_dir), str(stage)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    checkpoint = run_dir / "checkpoints/last.ckpt"
    assert checkpoint.is_dir() and (checkpoint / "checkpoint").is_dir()
    out = export_run(run_dir, tmp_path / "out", which="last")
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["checkpoint_format"] == "deepspeed" and config["training"]["zero_stage"] == stage
    assert config["training"]["step"] == 2
    expected = torch.load(run_dir / "expected.pt", weights_only=True)
    exported = Clusterer.from_pretrained(out).model.state_dict()
    assert set(exported) == set(expected)
    fake = torch.load(run_dir / "checkpoints/best.ckpt", weights_only=True)["state_dict"]
    assert not torch.equal(exported["embed.weight"], fake["model.embed.weight"])  # trained away from the start
    for key, value in expected.items():
        torch.testing.assert_close(exported[key], value.float(), rtol=0, atol=0)
