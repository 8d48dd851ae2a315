"""The LightningModule on its own (no Trainer): schedule, optimizer groups, evaluation row and its cache."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from emformer.data.stream import eval_set
from emformer.train.config import load_config, to_dict
from emformer.train.module import ClusterModule, WarmupCosine

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
VAL_KEYS = {"loss", "err", "err_anchored", "ari", "train_loss", "train_err", "err_em", "err_em_anchored", "loss_em",
            "err_lloyd", "err_oracle", "err_oracle_anchored", "loss_oracle", "err_em_depth",
            "err_em_depth_anchored", "err_init"}


def small_config(*overrides: str) -> dict:
    return to_dict(load_config(CONFIGS / "debug.yaml", ["eval.episodes=48", "eval.batch_size=20", *overrides]))


def test_warmup_then_cosine_to_the_floor():
    schedule = WarmupCosine(warmup_steps=10, max_steps=110, min_ratio=0.1)
    assert schedule(0) == pytest.approx(1 / 11)
    assert schedule(9) == pytest.approx(10 / 11)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert schedule(110) == pytest.approx(0.1)
    assert schedule(500) == pytest.approx(0.1)  # past max_steps it stays at the floor
    values = [schedule(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert WarmupCosine(0, 10, 0.0)(0) == pytest.approx(1.0)


def test_optimizer_decays_matrices_only_and_follows_the_schedule():
    module = ClusterModule(small_config("optim.weight_decay=0.05", "optim.lr=0.002", "optim.warmup_steps=4"))
    setup = module.configure_optimizers()
    optimizer, scheduler = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(module.model.parameters()))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.002 / 5)
    assert setup["lr_scheduler"]["interval"] == "step"
    state = scheduler.state_dict()
    json.dumps({k: v for k, v in state.items() if k != "lr_lambdas"})  # plain numbers: weights_only-safe
    assert math.isfinite(state["lr_lambdas"][0]["max_steps"])


def test_hyper_parameters_hold_the_config_as_plain_data():
    config = small_config()
    module = ClusterModule(config)
    assert module.hparams["config"] == config
    json.dumps(module.hparams["config"])  # no OmegaConf objects: checkpoints load with weights_only=True


@pytest.mark.parametrize("init", ["noisy_truth", "none"])
def test_evaluate_row_and_cached_baselines(init, monkeypatch):
    import emformer.models.baselines as baselines

    calls = []
    real = baselines.evaluate_baselines
    monkeypatch.setattr(baselines, "evaluate_baselines", lambda *a, **k: calls.append(1) or real(*a, **k))
    module = ClusterModule(small_config(f"task.init={init}"))
    first = module.evaluate()
    expected = VAL_KEYS if init != "none" else VAL_KEYS - {"err_init"}
    assert expected <= set(first), expected - set(first)
    assert all(isinstance(v, float) and math.isfinite(v) for v in first.values())
    assert 0 <= first["err"] <= first["err_anchored"] <= 1 and first["err_oracle"] <= first["err_em"] + 0.05
    chunks = len(calls)
    assert chunks == 3  # 48 episodes in chunks of 20
    # Training changes the model's numbers, not the baselines', which are not recomputed.
    optimizer = torch.optim.SGD(module.model.parameters(), lr=0.5)
    batch = eval_set(module.run_config.task, 7, 16)
    for _ in range(3):
        optimizer.zero_grad()
        module.training_step(batch, 0).backward()
        optimizer.step()
    second = module.evaluate()
    assert len(calls) == chunks
    assert second["loss"] != first["loss"] and second["err_em"] == first["err_em"]
    assert module.model.training  # evaluate() puts the model back in training mode


def test_training_step_uses_the_permutation_loss_without_an_init():
    from emformer.models.losses import anchored_cross_entropy, permutation_cross_entropy

    module = ClusterModule(small_config("task.init=none"))
    assert module.model.slots is not None and not module.anchored
    batch = eval_set(module.run_config.task, 3, 8)
    logits = module.model(batch["points"], batch["mask"], batch["init"], batch["kmask"])
    loss = module.training_step(batch, 0)
    torch.testing.assert_close(loss, permutation_cross_entropy(logits, batch["labels"], batch["mask"], batch["kmask"]))
    assert float(loss.detach()) <= float(anchored_cross_entropy(logits, batch["labels"], batch["mask"]).detach()) + 1e-6


def _batch(module: ClusterModule, count: int = 8) -> dict:
    from emformer.data.stream import eval_set

    return eval_set(module.run_config.task, 3, count)


@pytest.mark.parametrize("overrides, padded", [((), False), (("task.k_max=2",), False),
                                               (("task.n_max=40",), True), (("task.k=2", "task.k_max=3"), True)])
def test_attention_gets_a_mask_only_when_episodes_can_be_padded(overrides, padded, monkeypatch):
    import torch.nn.functional as F

    masks = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **k: masks.append(k.get("attn_mask")) or real(*a, **k))
    module = ClusterModule(small_config(*overrides))
    assert module.padded == padded
    module.training_step(_batch(module), 0)
    assert masks and all((m is not None) == padded for m in masks)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [(), "count head"])
def test_compiled_training_forward_gives_the_eager_loss_and_gradients(overrides):
    """The training forward compiled, and with a count head its pass too: the eager loss and gradients."""
    overrides = COUNT if overrides == "count head" else overrides
    eager = ClusterModule(small_config(*overrides))
    compiled = ClusterModule(small_config(*overrides, "trainer.compile=true"))
    compiled.model.load_state_dict(eager.model.state_dict())
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints keep their "model.*" keys
    batch = eager.on_before_batch_transfer(_batch(eager), 0)
    losses = []
    for module in (eager, compiled):
        loss = module.training_step(batch, 0)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(eager.model.named_parameters(), compiled.model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_count_head_adds_its_loss_and_per_k_figures():
    """model.count_head on a k range: the step adds the count cross-entropy; the val row gets k_acc, k_loss
    and err / err_em / err_oracle per k."""
    from emformer.models.losses import anchored_cross_entropy
    from emformer.models.losses import count_loss

    module = ClusterModule(small_config("task.k=2", "task.k_max=3", "task.n=12", "model.count_head=true"))
    batch = eval_set(module.run_config.task, 3, 8)
    logits = module.model(batch["points"], batch["mask"], batch["init"], batch["kmask"])
    count = module.model.count_logits(batch["points"], batch["mask"])
    torch.testing.assert_close(module.training_step(batch, 0), anchored_cross_entropy(logits, batch["labels"], batch["mask"])
                               + count_loss(count, batch["k"], 2).mean())
    row = module.evaluate()
    assert 0 <= row["k_acc"] <= 1 and row["k_loss"] > 0 and 0 <= row["train_k_acc"] <= 1
    assert {"err_k2", "err_k3", "err_em_k2", "err_em_k3", "err_oracle_k2", "err_oracle_k3"} <= set(row)
    assert "err_k2" not in ClusterModule(small_config()).evaluate()  # one k: no per-k figures


def test_evaluation_casts_the_episodes_as_deepspeed_casts_the_weights():
    """DeepSpeed's bf16 casts the weights and adds no autocast; its precision plugin casts each training batch.
    The evaluation goes through the same plugin, so it scores bf16 weights (it raised a dtype mismatch)."""
    from lightning.pytorch.plugins.precision import DeepSpeedPrecision

    module = ClusterModule(small_config())
    module.model.to(torch.bfloat16)
    module._trainer = SimpleNamespace(precision_plugin=DeepSpeedPrecision("bf16-mixed"))
    row = module.score(eval_set(module.run_config.task, 3, 16), 8)
    assert set(row) == {"loss", "err", "err_anchored", "ari"} and all(math.isfinite(v) for v in row.values())


COUNT = ("task.k=2", "task.k_max=3", "task.n=12", "model.count_head=true", "model.count_spectrum=true")


def test_count_pass_is_unmasked_for_fixed_n_and_takes_its_spectrum_from_the_host(monkeypatch):
    """The count head's pass over the point tokens gets no attention mask when n is fixed (flash kernels on a
    GPU), and its covariance spectrum is computed on the host before the batch moves (eigvalsh on the device
    waits for it every step): the step itself runs no eigvalsh, and gives the loss of the inline spectrum."""
    import torch.nn.functional as F

    from emformer.models.losses import count_loss
    from emformer.models.transformer import covariance_spectrum

    module = ClusterModule(small_config(*COUNT))
    raw = eval_set(module.run_config.task, 3, 8)
    batch = module.on_before_batch_transfer(raw, 0)
    torch.testing.assert_close(batch["spectrum"], covariance_spectrum(raw["points"], raw["mask"]))
    masks = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, *a, **k: masks.append((q.shape[2], k.get("attn_mask") is None)) or real(q, *a, **k))

    def no_eigvalsh(*args, **kwargs):
        raise AssertionError("eigvalsh in the training step")

    monkeypatch.setattr(torch.linalg, "eigvalsh", no_eigvalsh)
    loss = module.training_step(batch, 0)
    assert {unmasked for tokens, unmasked in masks if tokens == 12} == {True}  # the count pass: n tokens
    assert {unmasked for tokens, unmasked in masks if tokens == 15} == {False}  # n + k_max, k padded
    monkeypatch.undo()
    logits = module.model(raw["points"], raw["mask"], raw["init"], raw["kmask"])
    from emformer.models.losses import anchored_cross_entropy

    expected = (anchored_cross_entropy(logits, raw["labels"], raw["mask"])
                + count_loss(module.model.count_logits(raw["points"], raw["mask"]), raw["k"], 2).mean())
    torch.testing.assert_close(loss, expected)


def test_the_step_keys_are_what_the_step_reads():
    """The loader keeps only `step_keys` (data/datamodule.py): the step must run on them alone."""
    assert set(ClusterModule(small_config()).step_keys) == {"points", "mask", "init", "kmask", "labels"}
    for overrides, extra in (((), set()), (("model.centroid_head=true",), {"means", "sigma"}), (COUNT, {"k"})):
        module = ClusterModule(small_config(*overrides))
        assert set(module.step_keys) == {"points", "mask", "init", "kmask", "labels"} | extra
        batch = eval_set(module.run_config.task, 3, 4)
        module.training_step(module.on_before_batch_transfer({k: batch[k] for k in module.step_keys}, 0), 0)


# ------------------------------------------------------------------------------------------------ iterating
ITERATE = ("model.passes=3", "model.passes_min=1")


def test_one_pass_trains_on_todays_loss_bit_for_bit():
    from emformer.models.losses import clustering_loss
    from emformer.train.scoring import model_inputs

    module = ClusterModule(small_config("model.centroid_head=true", "task.n_max=40"))
    batch = _batch(module)
    logits, centroids = module.model.forward_with_centroids(*model_inputs(batch, module.padded))
    assert torch.equal(module.training_step(batch, 0), clustering_loss(logits, batch, True, centroids))


def test_passes_per_batch_are_a_pure_function_of_seed_and_step():
    module, again = ClusterModule(small_config(*ITERATE)), ClusterModule(small_config(*ITERATE))
    drawn = [module.passes_at(step) for step in range(200)]
    assert drawn == [again.passes_at(step) for step in range(200)]  # a resumed run (same config) redraws them
    assert set(drawn) == {1, 2, 3} and all(drawn.count(t) > 40 for t in (1, 2, 3))
    other = ClusterModule(small_config(*ITERATE, "data.seed=1"))
    assert [other.passes_at(step) for step in range(200)] != drawn
    assert {ClusterModule(small_config("model.passes=2")).passes_at(step) for step in range(20)} == {2}


@pytest.mark.parametrize("tied", [False, True])
def test_several_passes_train_and_reach_every_block(tied, monkeypatch):
    module = ClusterModule(small_config(*ITERATE, f"model.tied={str(tied).lower()}"))
    calls = []
    single = module.model.forward_with_centroids
    monkeypatch.setattr(module.model, "forward_with_centroids", lambda *a: calls.append(1) or single(*a))
    monkeypatch.setattr(module, "passes_at", lambda step: 3)
    optimizer = torch.optim.AdamW(module.model.parameters(), lr=3e-3)
    batch = _batch(module, 32)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = module.training_step(batch, 0)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.model.blocks.parameters())
        assert all(float(p.grad.abs().sum()) > 0 for p in module.model.blocks[0].attn.parameters())
        optimizer.step()
        losses.append(float(loss))
    assert len(calls) == 12 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_grad_passes_take_the_loss_of_the_last_passes_only():
    from emformer.models.losses import iterated_loss
    from emformer.train.scoring import model_inputs

    module = ClusterModule(small_config("model.passes=3", "model.grad_passes=1"))
    batch = _batch(module)
    loss = module.training_step(batch, 0)
    outputs = module.model.forward_passes(*model_inputs(batch, module.padded), passes=3)
    torch.testing.assert_close(loss, iterated_loss(outputs[2:], batch, True), atol=0, rtol=0)
    two = ClusterModule(small_config("model.passes=3", "model.grad_passes=2"))
    two.model.load_state_dict(module.model.state_dict())
    torch.testing.assert_close(two.training_step(batch, 0), iterated_loss(outputs[1:], batch, True), atol=0, rtol=0)


def test_evaluation_runs_the_trained_passes(monkeypatch):
    module = ClusterModule(small_config(*ITERATE))
    calls = []
    single = module.model.forward_with_centroids
    monkeypatch.setattr(module.model, "forward_with_centroids", lambda *a: calls.append(1) or single(*a))
    module.score(_batch(module, 8), 20)
    assert len(calls) == 3  # one chunk, model.passes passes


@pytest.mark.slow
def test_more_passes_at_test_time_do_not_hurt_a_model_trained_to_iterate():
    """A tiny model trained with 1..3 passes per batch: its val error after 3, 5 and 8 passes is no worse than
    after its trained 3 beyond the paired noise (3 SE) of the same eval episodes."""
    from emformer.data.stream import EpisodeStream
    from emformer.models.metrics import misclustering_rate

    torch.manual_seed(0)
    module = ClusterModule(small_config(*ITERATE, "task.separation=3.0"))
    stream = EpisodeStream(module.run_config.task, seed=0, batch_size=32)
    optimizer = torch.optim.AdamW(module.model.parameters(), lr=3e-3)
    for step in range(150):
        optimizer.zero_grad()
        module.training_step(stream.batch(step), step).backward()
        optimizer.step()
    val = eval_set(module.run_config.task, 1_000_000_000, 512)
    module.model.eval()
    with torch.no_grad():
        outputs = module.model.forward_passes(val["points"], None, val["init"], None, passes=8)
    err = {t: misclustering_rate(outputs[t - 1][0].argmax(-1), val["labels"], val["mask"], 2).double()
           for t in (1, 3, 5, 8)}
    assert float(err[3].mean()) < float(err[1].mean())  # it learned to iterate
    for t in (5, 8):
        diff = err[t] - err[3]
        assert float(diff.mean()) <= 3 * float(diff.std()) / math.sqrt(len(diff)) + 1e-3, (t, err)


def test_the_final_evaluation_of_a_model_trained_to_iterate_keeps_every_pass_and_em_iteration():
    """episode_results: err after each of T passes and EM's after each of T iterations, [E, T]; the last pass
    is the model's err, EM's column em_iters is its err_em; a one-pass model keeps neither."""
    module = ClusterModule(small_config(*ITERATE, "eval.em_iters=2"))
    module.evaluate()
    out = module.episode_results()
    assert out["err_pass"].shape == out["err_em_iter"].shape == (48, 3)
    assert (out["err_pass"] >= 0).all() and (out["err_pass"] <= 1).all()
    assert torch.equal(torch.from_numpy(out["err_pass"][:, -1]), torch.from_numpy(out["err_model"]))
    assert torch.equal(torch.from_numpy(out["err_em_iter"][:, 1]), torch.from_numpy(out["err_em"]))
    assert not (out["err_em_iter"][:, 0] == out["err_em_iter"][:, 2]).all()  # the columns are other iterations
    one = ClusterModule(small_config())
    one.evaluate()
    assert not {"err_pass", "err_em_iter"} & one.episode_results().keys()
