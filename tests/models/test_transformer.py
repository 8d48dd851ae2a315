"""The clustering transformer (DESIGN §2): equivariance, masking, the init:none mode, and that it learns."""
from __future__ import annotations

import pytest
import torch

from emformer.data.episodes import sample_episodes
from emformer.data.tasks import TaskSpec
from emformer.models.losses import clustering_loss
from emformer.models.config import ModelConfig
from emformer.errors import ConfigError
from emformer.models.transformer import ClusterTransformer, TransformerConfig, covariance_spectrum

ATOL = 1e-5


def make_model(seed: int = 0, **overrides) -> ClusterTransformer:
    torch.manual_seed(seed)
    cfg = TransformerConfig(**{"d_in": 4, "k_max": 3, "depth": 2, "heads": 2, "width": 16, **overrides})
    return ClusterTransformer(cfg).eval()


def episodes(spec: TaskSpec, count: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    return sample_episodes(spec.validate(), seed, range(count))


def inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return batch["points"], batch["mask"], batch["init"], batch["kmask"]


SPEC = TaskSpec(k=3, d=4, n=24, separation=3.0)


def test_permuting_points_permutes_the_logits():
    model, batch = make_model(), episodes(SPEC)
    points, mask, init, kmask = inputs(batch)
    perm = torch.randperm(points.shape[1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(points, mask, init, kmask)
        permuted = model(points[:, perm], mask[:, perm], init, kmask)
    torch.testing.assert_close(permuted, logits[:, perm], atol=ATOL, rtol=0)


def test_permuting_centroids_permutes_the_logit_columns():
    model, batch = make_model(), episodes(SPEC)
    points, mask, init, kmask = inputs(batch)
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        logits = model(points, mask, init, kmask)
        permuted = model(points, mask, init[:, perm], kmask[:, perm])
    torch.testing.assert_close(permuted, logits[..., perm], atol=ATOL, rtol=0)


def test_padded_points_change_nothing():
    """Appending masked points (whatever their values) leaves the real points' logits as they were."""
    model, batch = make_model(), episodes(SPEC)
    points, mask, init, kmask = inputs(batch)
    pad = 9
    garbage = torch.randn(points.shape[0], pad, points.shape[2]) * 100
    padded_points = torch.cat([points, garbage], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(points.shape[0], pad, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        logits = model(points, mask, init, kmask)
        padded = model(padded_points, padded_mask, init, kmask)
    torch.testing.assert_close(padded[:, : points.shape[1]], logits, atol=ATOL, rtol=0)
    # Padding in the middle too (the stream pads at the end, but masks are what count).
    order = torch.randperm(padded_points.shape[1], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        shuffled = model(padded_points[:, order], padded_mask[:, order], init, kmask)
    torch.testing.assert_close(shuffled, padded[:, order], atol=ATOL, rtol=0)


def test_padded_clusters_change_nothing_and_get_minus_inf():
    """Episodes of 2 or 3 real clusters in a k_max=3 model: a padded centroid's values do not matter."""
    model = make_model()
    spec = TaskSpec(k=2, k_max=3, d=4, n=24, separation=3.0)
    batch = episodes(spec)
    points, mask, init, kmask = inputs(batch)
    assert (kmask.sum(1) == 2).any() and (kmask.sum(1) >= 2).all()
    other = init.clone()
    other[~kmask] = torch.randn(int((~kmask).sum()), init.shape[-1]) * 50
    with torch.no_grad():
        logits = model(points, mask, init, kmask)
        changed = model(points, mask, other, kmask)
    assert torch.isinf(logits[~kmask[:, None, :].expand_as(logits)]).all()
    assert torch.isfinite(logits[kmask[:, None, :].expand_as(logits)]).all()
    torch.testing.assert_close(changed, logits, atol=ATOL, rtol=0)
    # The real clusters' probabilities are a proper softmax over the real slots only.
    proba = logits.softmax(-1)
    torch.testing.assert_close(proba.sum(-1), torch.ones_like(proba[..., 0]))


def test_episodes_do_not_see_each_other():
    """Batching is only batching: an episode's logits do not depend on the other episodes of the batch."""
    model, batch = make_model(), episodes(SPEC)
    with torch.no_grad():
        together = model(*inputs(batch))
        alone = model(*(t[2:3] for t in inputs(batch)))
    torch.testing.assert_close(alone, together[2:3], atol=ATOL, rtol=0)


def test_learned_centroids_mode_ignores_the_init():
    model = make_model(learned_centroids=True)
    spec = TaskSpec(k=3, d=4, n=24, separation=3.0, init="none")
    batch = episodes(spec)
    points, mask, init, kmask = inputs(batch)
    with torch.no_grad():
        logits = model(points, mask, init, kmask)
        other = model(points, mask, torch.randn_like(init), kmask)
    torch.testing.assert_close(other, logits)
    perm = torch.randperm(points.shape[1], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        permuted = model(points[:, perm], mask[:, perm], init, kmask)
    torch.testing.assert_close(permuted, logits[:, perm], atol=ATOL, rtol=0)


def test_centroid_head_starts_at_the_init():
    model, batch = make_model(centroid_head=True), episodes(SPEC)
    points, mask, init, kmask = inputs(batch)
    with torch.no_grad():
        _, centroids = model.forward_with_centroids(points, mask, init, kmask)
    torch.testing.assert_close(centroids, init)


@pytest.mark.parametrize("init", ["noisy_truth", "none"])
def test_one_optimisation_step_reduces_the_loss_on_a_fixed_batch(init):
    spec = TaskSpec(k=3, d=4, n=32, separation=3.0, init=init)
    batch = episodes(spec, count=32, seed=5)
    model = make_model(learned_centroids=init == "none").train()
    anchored = init != "none"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss = clustering_loss(model(*inputs(batch)), batch, anchored)
    optimizer.zero_grad()
    loss.backward()
    before = float(loss.detach())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    optimizer.step()
    with torch.no_grad():
        after = clustering_loss(model(*inputs(batch)), batch, anchored)
    assert float(after) < before


def test_config_round_trip_and_errors():
    cfg = TransformerConfig(d_in=5, k_max=4, depth=3, heads=2, width=8, centroid_head=True)
    assert TransformerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown TransformerConfig key.*'bogus'"):
        TransformerConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="multiple of heads"):
        ClusterTransformer(TransformerConfig(width=10, heads=4))
    task = TaskSpec(k=2, k_max=5, d=3, d_max=8, init="none")
    model = ModelConfig(depth=2, heads=2, width=16, mlp_ratio=2)
    from_run = TransformerConfig.from_task_and_model(task, model)
    assert (from_run.d_in, from_run.k_max, from_run.learned_centroids) == (8, 5, True)
    assert (from_run.depth, from_run.heads, from_run.width, from_run.mlp_ratio) == (2, 2, 16, 2)


def test_parameter_count_of_the_shipped_models():
    """The figures the configs' comments quote (28K tiny on k2_d4, 209K small on k3_d8)."""
    tiny = ClusterTransformer(TransformerConfig(d_in=4, k_max=2, depth=2, heads=2, width=32))
    small = ClusterTransformer(TransformerConfig(d_in=8, k_max=3, depth=4, heads=4, width=64))
    assert 25_000 < tiny.num_parameters() < 30_000
    assert 200_000 < small.num_parameters() < 215_000


@pytest.mark.parametrize("centroid_head", [False, True])
def test_no_mask_equals_an_all_true_mask(centroid_head):
    """Fixed n and k: passing no masks (SDPA unmasked, free to pick a fused kernel) gives the masked output."""
    model, batch = make_model(centroid_head=centroid_head), episodes(SPEC)
    points, mask, init, kmask = inputs(batch)
    assert mask.all() and kmask.all()
    with torch.no_grad():
        masked = model.forward_with_centroids(points, mask, init, kmask)
        unmasked = model.forward_with_centroids(points, None, init, None)
        only_points = model.forward_with_centroids(points, mask, init, None)
    for got in (unmasked, only_points):
        torch.testing.assert_close(got[0], masked[0], atol=ATOL, rtol=0)
        if centroid_head:
            torch.testing.assert_close(got[1], masked[1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("count_spectrum", [False, True])
def test_count_head_reads_the_points_alone(count_spectrum):
    """P(k | X) over [k_min, k_max]: invariant to the points' order and to padded points, and it never sees
    the init (so it cannot read k off the number of centroid tokens)."""
    model = make_model(count_head=True, k_min=2, count_spectrum=count_spectrum)
    batch = episodes(TaskSpec(k=2, k_max=3, d=4, n=20, n_max=24, separation=3.0))
    points, mask = batch["points"], batch["mask"]
    with torch.no_grad():
        logits = model.count_logits(points, mask)
        assert logits.shape == (points.shape[0], 2)
        perm = torch.randperm(points.shape[1], generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(model.count_logits(points[:, perm], mask[:, perm]), logits, atol=ATOL, rtol=0)
        garbage = torch.where(mask[..., None], points, torch.randn_like(points) * 50)
        torch.testing.assert_close(model.count_logits(garbage, mask), logits, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="no count head"):
        make_model().count_logits(points, mask)


def test_covariance_spectrum_counts_clusters_and_ignores_scale_shift_rotation_and_padding():
    """k well-separated spherical clusters: k - 1 eigenvalues stand above the noise floor; the features do
    not change when the points are scaled, shifted or rotated, or zero-padded to more coordinates (zeros
    appended), and padded points are ignored; the last feature is log n."""
    spec = TaskSpec(k=3, d=6, n=200, n_max=240, separation=12.0)
    batch = episodes(spec, count=4)
    points, mask = batch["points"].double(), batch["mask"]
    spectrum = covariance_spectrum(points, mask)
    assert spectrum.shape == (4, 7)
    torch.testing.assert_close(spectrum[:, -1], batch["n"].double().log())
    floor = spectrum[:, 2:6]  # the noise: four about equal values, well below the two of the means
    assert (spectrum[:, 1] > 2 * floor[:, 0]).all() and (floor.amax(1) < 1.5 * floor.amin(1)).all()
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    moved = (points @ q * 37.0 + 5.0) * mask[..., None] + (~mask[..., None]) * 123.0  # padded points: garbage
    torch.testing.assert_close(covariance_spectrum(moved, mask), spectrum)
    padded = covariance_spectrum(torch.nn.functional.pad(points, (0, 3)), mask)
    torch.testing.assert_close(padded[:, :6], spectrum[:, :6])
    assert (padded[:, 6:9] == 0).all()
    with pytest.raises(ConfigError, match="model.count_spectrum: expected false unless model.count_head"):
        ModelConfig(count_spectrum=True).validate()


def test_the_read_out_runs_in_float32_under_autocast():
    """Under bf16 autocast the blocks compute in bf16, but the logits are the float32 product of the final
    states: bf16 would quantise them (steps of 0.125 once they reach 16)."""
    model, batch = make_model(width=32), episodes(SPEC)
    final = {}
    model.ln_final.register_forward_hook(lambda module, args, out: final.update(x=out))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(*inputs(batch))
    assert logits.dtype == torch.float32
    n = batch["points"].shape[1]
    x = final["x"].float()
    expected = (x[:, :n] @ model.read_point.weight.T) @ (x[:, n:] @ model.read_centroid.weight.T).transpose(1, 2)
    torch.testing.assert_close(logits, expected / 32 ** 0.5, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------ iterating
def test_one_pass_is_the_single_forward_bit_for_bit():
    model, batch = make_model(centroid_head=True), episodes(TaskSpec(k=2, k_max=3, d=4, n=16, n_max=24))
    with torch.no_grad():
        single = model.forward_with_centroids(*inputs(batch))
        (passed,) = model.forward_passes(*inputs(batch))
        assert torch.equal(model(*inputs(batch)), single[0])
    assert torch.equal(passed[0], single[0]) and torch.equal(passed[1], single[1])


@pytest.mark.parametrize("centroid_head", [False, True])
def test_each_pass_starts_from_the_last_ones_centroids(centroid_head):
    """Pass t + 1 is one pass from pass t's centroids: the head's, else the soft M-step (padded clusters and
    points stay out of it); forward is the last of cfg.passes passes."""
    model = make_model(centroid_head=centroid_head, passes=3)
    if centroid_head:  # away from its start at "refined = init", so that the passes differ
        torch.nn.init.normal_(model.centroid_head.weight, std=0.1)
    batch = episodes(TaskSpec(k=2, k_max=3, d=4, n=16, n_max=24))
    points, mask, init, kmask = inputs(batch)
    with torch.no_grad():
        outputs = model.forward_passes(points, mask, init, kmask)
        assert len(outputs) == 3 and torch.equal(model(points, mask, init, kmask), outputs[-1][0])
        every = model(points, mask, init, kmask, every_pass=True)
        assert every.shape == (3, *outputs[0][0].shape)
        assert all(torch.equal(every[t], outputs[t][0]) for t in range(3))
        logits, head = outputs[0]
        if centroid_head:
            expected = head
        else:
            r = torch.softmax(logits, -1).nan_to_num(0) * mask[..., None]
            expected = torch.einsum("bnk,bnd->bkd", r, points) / r.sum(1)[..., None].clamp(min=1e-12)
            expected = torch.where(kmask[..., None], expected, init)  # a padded cluster keeps its zero centroid
        again = model.forward_with_centroids(points, mask, expected, kmask)
    torch.testing.assert_close(outputs[1][0], again[0], atol=ATOL, rtol=0)
    assert not torch.equal(outputs[1][0], outputs[0][0])


def test_detached_passes_carry_no_gradient_and_the_same_values():
    model = make_model(passes=3)
    points, mask, init, kmask = inputs(episodes(TaskSpec(k=2, k_max=3, d=4, n=16, n_max=24)))
    full = model.forward_passes(points, mask, init, kmask)
    truncated = model.forward_passes(points, mask, init, kmask, detached=2)
    assert [logits.requires_grad for logits, _ in truncated] == [False, False, True]
    for (a, _), (b, _) in zip(full, truncated):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    truncated[-1][0].logsumexp(-1).sum().backward()
    assert model.embed.weight.grad.abs().sum() > 0  # the last pass still trains every weight it reads


def test_tied_blocks_share_one_blocks_parameters():
    untied, tied = make_model(depth=3), make_model(depth=3, tied=True)
    per_block = sum(p.numel() for p in untied.blocks[0].parameters())
    assert untied.num_parameters() - tied.num_parameters() == 2 * per_block
    assert len(tied.layers()) == 3 and all(block is tied.blocks[0] for block in tied.layers())
    batch = episodes(SPEC)
    loss = clustering_loss(tied(*inputs(batch)), batch, True)
    loss.backward()
    assert tied.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_passes_keys_are_checked():
    with pytest.raises(ConfigError, match="model.passes: expected an integer >= 1"):
        ModelConfig(passes=0).validate()
    with pytest.raises(ConfigError, match=r"model.passes_min: expected null or an integer in \[1, model.passes \(2\)\]"):
        ModelConfig(passes=2, passes_min=3).validate()
    with pytest.raises(ConfigError, match="model.grad_passes: expected null or an integer >= 1"):
        ModelConfig(passes=2, grad_passes=0).validate()
    cfg = TransformerConfig(d_in=4, k_max=3, passes=4, passes_min=2, tied=True)
    assert TransformerConfig.from_dict(cfg.to_dict()) == cfg
    old = {key: value for key, value in cfg.to_dict().items() if key not in ("passes", "passes_min", "tied")}
    assert TransformerConfig.from_dict(old).passes == 1  # exports from before the keys: one pass
