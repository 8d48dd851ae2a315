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

from emformer.data.standardize import STANDARD_SCALE
from emformer.data.tasks import TaskSpec
from emformer.train.cli import main as cli_main
from emformer.errors import CheckpointError, ConfigError
from emformer.atomic import sha256_file
from emformer.models.clusterer import Clusterer
from emformer.models.transformer import ClusterTransformer, TransformerConfig
from emformer.train.export import card as export_card
from emformer.train.export import onnx as export_onnx
from emformer.train.cli import main
from emformer.train.checkpoints import load_checkpoint
from emformer.train.export.command import export_checkpoint, export_run, input_scale, parse_clusterer_defaults
from export_fixtures import FAKE_STEP, FAKE_VAL_ROW, architecture_of, make_fake_run, subprocess_env


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
    model = ClusterTransformer(architecture_of(checkpoint["hyper_parameters"]["config"]))
    model.load_state_dict({k[len("model."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")})
    return model.eval()


# ------------------------------------------------------------------------------------------- format
def test_export_writes_the_documented_files(fake_run: Path, fake_export: Path) -> None:
    names = sorted(p.name for p in fake_export.iterdir())
    assert names == ["README.md", "config.json", "model.safetensors"]  # no temp files left behind
    config = json.loads((fake_export / "config.json").read_text())
    run_config = torch.load(fake_run / "checkpoints/best.ckpt", weights_only=True)["hyper_parameters"]["config"]
    assert config["format"] == "emformer-export" and config["format_version"] == 1
    assert config["architecture"] == architecture_of(run_config).to_dict()
    assert config["task"] == run_config["task"]
    task = run_config["task"]
    assert config["supported"]["k"]["max"] == config["architecture"]["k_max"] == task["k"]
    assert config["supported"]["d"]["max"] == config["architecture"]["d_in"] == task["d"]
    assert config["supported"]["n"]["trained"] == [task["n"], task["n"]]
    assert config["training"]["commit"] == "0123abcd" and config["training"]["step"] == FAKE_STEP
    # the card reports the test set (eval.test_seed); the eval-set row the checkpoint was selected on is kept apart
    assert config["selection"]["err_em"] == FAKE_VAL_ROW["err_em"]
    assert config["eval"]["split"] == "test" and config["eval"]["seed"] == run_config["eval"]["test_seed"]
    assert config["eval"]["seed"] != run_config["eval"]["seed"]
    assert config["files"]["model.safetensors"]["sha256"] == sha256_file(fake_export / "model.safetensors")
    assert 0.5 < config["input_scale"] < 3
    card = (fake_export / "README.md").read_text()
    for key in ("err", "err_em", "err_oracle", "loss"):
        assert export_card._fmt(config["eval"][key]) in card
    assert f"eval.test_seed = {run_config['eval']['test_seed']}" in card and "0.1010" not in card
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
    assert config["selection"]["step"] == FAKE_STEP  # the run dir was found from the checkpoint's path
    assert main(["export", str(fake_run / "checkpoints/best.ckpt"), "--out", str(tmp_path / "c"), "--best"]) == 2
    assert "--best: only applies to a run directory" in capsys.readouterr().err


def test_export_checkpoint_without_run_dir(fake_run: Path, tmp_path: Path) -> None:
    lone = tmp_path / "lone.ckpt"
    lone.write_bytes((fake_run / "checkpoints/best.ckpt").read_bytes())
    out = export_run(lone, tmp_path / "out")  # export_run takes a checkpoint as well as a run directory
    config = json.loads((out / "config.json").read_text())
    assert config["selection"] is None and config["training"]["commit"] is None
    assert config["eval"]["split"] == "test"  # the test set needs only the checkpoint
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
    with pytest.raises(CheckpointError, match="garbage.ckpt: corrupt or unreadable checkpoint"):
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


# ------------------------------------------------------------------------------------------- real runs
@pytest.mark.slow
def test_trained_run_export_matches_checkpoint_in_torch_and_onnx(tiny_run: Path, tiny_export: Path) -> None:
    """The real debug run's checkpoint, exported with --onnx: the safetensors model gives the checkpoint's
    logits exactly, onnxruntime within 1e-4, at several batch sizes and n (n dynamic, not baked in)."""
    import onnxruntime

    reference = _model_from_checkpoint(tiny_run / "checkpoints/last.ckpt")
    clusterer = Clusterer.from_pretrained(tiny_export)
    session = onnxruntime.InferenceSession(str(tiny_export / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch, n in ((1, 3), (2, 17), (4, 64), (2, 300)):
        inputs = _random_inputs(reference.cfg, batch, n, seed=batch * n)
        with torch.inference_mode():
            expected = reference(*inputs)
            assert torch.equal(clusterer.model(*inputs), expected)
        (got,) = session.run(None, dict(zip(("points", "mask", "init", "kmask"), (t.numpy() for t in inputs))))
        assert got.shape == tuple(expected.shape)
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=1e-4)
    config = json.loads((tiny_export / "config.json").read_text())
    assert config["onnx"]["max_abs_diff"] < 1e-4 and config["onnx"]["dynamic"] == ["B", "n"]
    assert config["files"]["model.onnx"]["sha256"] == sha256_file(tiny_export / "model.onnx")
    done = json.loads((tiny_run / "DONE").read_text())
    assert config["selection"]["err"] == done["val"]["err"] and config["selection"]["step"] == done["val"]["step"]
    meta = json.loads((tiny_run / "meta.json").read_text())
    assert config["training"]["commit"] == meta["git_commit"]
    card = (tiny_export / "README.md").read_text()
    assert export_card._fmt(config["eval"]["err_em"]) in card and export_card._fmt(config["eval"]["err_oracle"]) in card


@pytest.mark.slow
def test_onnx_mismatch_is_an_error_and_writes_nothing(tiny_export: Path, tmp_path: Path) -> None:
    """Check the exported graph against a model with other weights: the verifier must refuse it."""
    config = json.loads((tiny_export / "config.json").read_text())
    architecture = TransformerConfig.from_dict(config["architecture"])
    torch.manual_seed(123)
    other = export_onnx._LogitsOnly(ClusterTransformer(architecture)).eval()
    with pytest.raises(CheckpointError, match="ONNX logits differ from torch"):
        export_onnx._check_onnx(other, architecture, (tiny_export / "model.onnx").read_bytes(), tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_reexport_without_onnx_removes_stale_onnx(fake_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"an onnx file of an earlier export")
    export_run(fake_run, out)
    assert not (out / "model.onnx").exists()


def test_reexport_keeps_the_sections_and_title_a_maintainer_gave_the_card(fake_run: Path, tmp_path: Path) -> None:
    out = export_run(fake_run, tmp_path / "model")
    card = out / "README.md"
    lines = card.read_text().split("\n", 1)
    card.write_text("# emformer model card: my-model\n" + lines[1] + "\n## Known limits\n\n- a maintainer's line\n")
    export_run(fake_run, out)
    text = card.read_text()
    assert text.startswith("# emformer model card: my-model\n") and text.count("## Known limits") == 1
    assert text.rstrip().endswith("- a maintainer's line") and text.count("## Evaluation") == 1


# ------------------------------------------------------------------------------------------- DeepSpeed
# One launch of two CPU ranks (gloo) writes a ZeRO-2 and a ZeRO-3 checkpoint, each in the layout Lightning's
# DeepSpeedStrategy uses (a directory at checkpoints/last.ckpt, tag "checkpoint", the Lightning client state
# beside the module states), after one optimizer step so the weights differ from the fake run's.
DEEPSPEED_SCRIPT = r"""
import importlib, sys
from pathlib import Path
import torch, deepspeed
from emformer.models.transformer import ClusterTransformer, TransformerConfig
from emformer.train.config import to_run_config

# The CPU backend would compile a shared-memory op (~20 s); gloo needs none. importlib, not `import ... as`:
# deepspeed.comm re-exports the name `torch` (the torch module itself).
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
deepspeed.init_distributed(dist_backend="gloo")
rank = torch.distributed.get_rank()
for stage, run_dir in ((2, Path(sys.argv[1])), (3, Path(sys.argv[2]))):
    config = torch.load(run_dir / "checkpoints/best.ckpt", weights_only=True)["hyper_parameters"]["config"]

    class Module(torch.nn.Module):  # the LightningModule's layout: the transformer under `model.`
        def __init__(self):
            super().__init__()
            run = to_run_config(config)
            self.model = ClusterTransformer(TransformerConfig.from_task_and_model(run.task, run.model))

    torch.manual_seed(stage)
    module = Module()
    engine, *_ = deepspeed.initialize(
        model=module, model_parameters=module.parameters(), optimizer=torch.optim.AdamW(module.parameters(), lr=1e-2),
        config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage},
                "zero_allow_untested_optimizer": True})
    generator = torch.Generator().manual_seed(rank)
    points, init = torch.randn(2, 8, 4, generator=generator), torch.randn(2, 2, 4, generator=generator)
    loss = engine.module.model(points, torch.ones(2, 8, dtype=torch.bool), init, torch.ones(2, 2, dtype=torch.bool)).logsumexp(-1).mean()
    engine.backward(loss)
    engine.step()
    client = {"hyper_parameters": {"config": config}, "global_step": 1, "epoch": 0}
    engine.save_checkpoint(str(run_dir / "checkpoints" / "last.ckpt"), client_state=client, tag="checkpoint")
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):  # collective under ZeRO-3
        if rank == 0:
            torch.save({k: v.detach().clone() for k, v in engine.module.model.state_dict().items()}, run_dir / "expected.pt")
"""


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    pytest.importorskip("deepspeed")
    base = tmp_path_factory.mktemp("deepspeed")
    runs = {}
    for stage in (2, 3):
        runs[stage] = make_fake_run(base / f"zero{stage}")
        (runs[stage] / "checkpoints/last.ckpt").unlink()  # DeepSpeed writes a directory in its place
    script = base / "make_ds.py"
    script.write_text(DEEPSPEED_SCRIPT)
    env = subprocess_env()
    env["DS_ACCELERATOR"] = "cpu"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_port", str(29500 + os.getpid() % 2000), str(script), str(runs[2]), str(runs[3])]
    result = subprocess.run(command, cwd=base, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_checkpoint_exports(stage: int, deepspeed_runs: dict[int, Path], tmp_path: Path) -> None:
    """A ZeRO-2/3 checkpoint directory (ZeRO-3: every parameter sharded over the two ranks) exports to the
    consolidated fp32 weights, exactly the ones the engine gathers."""
    run_dir = deepspeed_runs[stage]
    checkpoint = run_dir / "checkpoints/last.ckpt"
    assert checkpoint.is_dir() and len(list((checkpoint / "checkpoint").glob("*optim_states.pt"))) == 2
    out = export_run(run_dir, tmp_path / "out", which="last")
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["checkpoint_format"] == "deepspeed" and config["training"]["zero_stage"] == stage
    assert config["training"]["step"] == 1
    expected = torch.load(run_dir / "expected.pt", weights_only=True)
    exported = Clusterer.from_pretrained(out).model.state_dict()
    assert set(exported) == set(expected)
    fake = torch.load(run_dir / "checkpoints/best.ckpt", weights_only=True)["state_dict"]
    assert not torch.equal(exported["embed.weight"], fake["model.embed.weight"])  # trained away from the start
    for key, value in expected.items():
        torch.testing.assert_close(exported[key], value.float(), rtol=0, atol=0)


def test_deepspeed_directory_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="not a DeepSpeed checkpoint"):
        load_checkpoint(empty)
    (tmp_path / "ds/checkpoint").mkdir(parents=True)
    (tmp_path / "ds/latest").write_text("checkpoint")
    with pytest.raises(CheckpointError, match="no model-states file"):
        load_checkpoint(tmp_path / "ds")


def test_input_scale_of_a_standardized_task_is_the_standardization_target() -> None:
    """Episodes standardized in training have the target spread at every d: config.json says so, not the
    spread pooled over zero-padded coordinates (0.75 for the shipped model before)."""
    spec = TaskSpec(k=2, k_max=4, d=8, d_min=2, n=32, standardize=True)
    assert input_scale(spec) == STANDARD_SCALE and input_scale(spec, d=3) == STANDARD_SCALE
    raw = input_scale(TaskSpec(k=2, k_max=4, d=8, d_min=2, n=32))
    assert raw != pytest.approx(STANDARD_SCALE, abs=0.05)


def test_clusterer_defaults_are_written_and_applied_and_given_params_win(fake_run: Path, tmp_path: Path) -> None:
    out = export_run(fake_run, tmp_path / "out", clusterer_defaults=parse_clusterer_defaults(["n_init=4", "em_steps=2"]))
    assert json.loads((out / "config.json").read_text())["clusterer_defaults"] == {"n_init": 4, "em_steps": 2}
    clusterer = Clusterer.from_pretrained(out)
    assert (clusterer.n_init, clusterer.em_steps) == (4, 2)
    assert Clusterer.from_pretrained(out, n_init=1).get_params()["n_init"] == 1
    assert Clusterer.from_pretrained(export_run(fake_run, tmp_path / "plain")).n_init == 1  # none written: as before
    for bad, match in ((["n_init"], "expected KEY=INT"), (["batch_size=3"], "expected KEY=INT"),
                       (["n_init=x"], "not an integer"), (["n_init=0"], ">= 1")):
        with pytest.raises(ConfigError, match=match):
            parse_clusterer_defaults(bad)
    config = json.loads((out / "config.json").read_text())
    config["clusterer_defaults"] = {"device": 1}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config.json: clusterer_defaults.device: not a parameter"):
        Clusterer.from_pretrained(out)


def test_rescore_remeasures_the_test_figures_in_place_and_keeps_added_sections(tiny_export, tmp_path, capsys):
    """`emformer export EXPORT --rescore`: the eval row is measured again from the export's own weights (the
    figures of a fresh export, with the episodes version), the weights stay, a hand-added card section stays."""
    import shutil

    from emformer.data.tasks import EPISODES_VERSION
    from emformer.models.export_format import read_export_config, write_export_config

    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    want = read_export_config(tiny_export)["eval"]
    config = read_export_config(export)
    config["eval"] = {**config["eval"], "err": 0.5, "episodes_version": 1}
    write_export_config(export, config)
    card = export / "README.md"
    card.write_text(card.read_text() + "\n## Known limits\n\n- a line a maintainer wrote\n")
    weights = (export / "model.safetensors").read_bytes()

    assert cli_main(["export", str(export), "--rescore"]) == 0
    got = read_export_config(export)["eval"]
    assert got["episodes_version"] == EPISODES_VERSION and got["err"] == want["err"]
    assert {k: v for k, v in got.items() if k != "episodes_version"} == {
        k: v for k, v in want.items() if k != "episodes_version"}
    assert (export / "model.safetensors").read_bytes() == weights
    text = card.read_text()
    assert text.count("## Evaluation") == 1 and f"episodes version {EPISODES_VERSION}" in text
    assert text.rstrip().endswith("- a line a maintainer wrote")
    assert "rescored" in capsys.readouterr().out
    assert cli_main(["export", str(export), "--rescore", "--out", str(tmp_path / "x")]) == 2
    assert "--rescore: takes an export directory alone" in capsys.readouterr().err


def test_rescore_refits_p_k_of_x_as_a_fresh_export_would_even_from_a_retired_form(tmp_path):
    """A count-head export whose count_head is in the mixture form an earlier emformer wrote does not load;
    `--rescore` refits it in place, to what a fresh export of the same run writes, and then it loads."""
    from emformer.models.export_format import read_export_config, write_export_config

    run = make_fake_run(tmp_path / "run", ("task.k=2", "task.k_max=4", "model.count_head=true", "eval.episodes=48"))
    export = export_run(run, tmp_path / "export")
    config = read_export_config(export)
    fresh = config["count_head"]
    config["count_head"] = {"temperature": 0.8, "bic_weight": 0.5, "bic_share": 0.2, "bic_share_per_log_n": 0.1}
    write_export_config(export, config)
    with pytest.raises(CheckpointError, match="count_head.bic_share: .* --rescore"):
        Clusterer.from_pretrained(export, n_clusters="auto")
    assert cli_main(["export", str(export), "--rescore"]) == 0
    refit = read_export_config(export)["count_head"]
    assert refit == fresh and refit["fitted_on"]["episodes"] == 2 * config["training"]["run_config"]["eval"]["episodes"]
    assert Clusterer.from_pretrained(export, n_clusters="auto").k_posterior.uses_bic
