"""EpisodeStream: batch g of rank r is fixed by (seed, rank, world, g), whatever the workers; no episode is
duplicated or lost across ranks x workers; a resumed stream continues exactly."""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

from emformer.data import stream as stream_module
from emformer.data.episodes import EPISODE_KEYS, sample_episodes
from emformer.data.stream import EpisodeStream, eval_set, pool_eval_set, resampled_indices, resolve_rank
from emformer.data.tasks import TaskSpec
from emformer.errors import ConfigError, DataError
from emformer.train.config import load_run_config

BASE = Path(__file__).resolve().parents[2] / "configs" / "base.yaml"
SPEC = TaskSpec(k=2, d=2, n=8)


def take(stream, steps: int, workers: int = 0) -> list[dict]:
    batches = iter(DataLoader(stream, batch_size=None, num_workers=workers))
    try:
        return list(itertools.islice(batches, steps))
    finally:
        # Stop the workers now: left to a later gc cycle (an exception's traceback keeps the iterator alive),
        # torch's shutdown waits 5 s per worker.
        getattr(batches, "_shutdown_workers", lambda: None)()


def indices(batches) -> list[list[int]]:
    return [b["index"].tolist() for b in batches]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in EPISODE_KEYS:
            assert torch.equal(x[key], y[key]), key


def test_fresh_order_ranks_and_batch_split():
    one = EpisodeStream(SPEC, seed=3, batch_size=8, rank=0, world_size=1)
    halves = [EpisodeStream(SPEC, seed=3, batch_size=4, rank=r, world_size=2) for r in range(2)]
    assert indices(take(halves[1], 2)) == [[4, 5, 6, 7], [12, 13, 14, 15]]
    for g in range(3):
        whole, parts = one.batch(g), [h.batch(g) for h in halves]
        for key in EPISODE_KEYS:
            assert torch.equal(whole[key], torch.cat([p[key] for p in parts])), key
    assert_batches_equal([one.batch(0)], [sample_episodes(SPEC, 3, range(8))])


@pytest.mark.parametrize("source", ["fresh", "pool"])
def test_worker_count_does_not_change_the_sequence_and_resume_continues(source):
    make = lambda start=0: EpisodeStream(SPEC, source=source, seed=1, batch_size=4, pool_size=10,
                                        rank=1, world_size=2, start_step=start)
    serial = take(make(), 7)
    assert_batches_equal(take(make(), 7, workers=2), serial)
    assert_batches_equal(take(make(start=4), 3, workers=2), serial[4:])
    assert_batches_equal(take(make(start=4), 3), serial[4:])


def test_pool_visits_each_episode_once_per_epoch_across_ranks():
    pool, batch, world = 24, 4, 2  # 3 steps of 2 ranks x 4 = one epoch
    streams = [EpisodeStream(SPEC, source="pool", seed=5, batch_size=batch, pool_size=pool, rank=r, world_size=world)
               for r in range(world)]
    epochs = [sorted(sum((s.batch(g)["index"].tolist() for s in streams for g in steps), []))
              for steps in (range(0, 3), range(3, 6))]
    assert epochs == [list(range(pool)), list(range(pool))]
    first = [streams[0].batch(g)["index"].tolist() for g in range(6)]
    assert first[:3] != first[3:]  # a fresh permutation each epoch
    # pool episodes are episodes 0..N-1 of the seed, cached or regenerated alike
    cached = streams[1].batch(4)
    assert_batches_equal([cached], [sample_episodes(SPEC, 5, cached["index"])])


@pytest.mark.parametrize("pool,batch,world,workers", [(1, 3, 1, 1), (7, 2, 2, 2), (30, 4, 3, 2), (64, 8, 2, 1)])
def test_each_epoch_covers_the_pool_across_ranks_and_workers(pool, batch, world, workers):
    steps = 3 * -(-pool // (batch * world)) + 2
    per_rank = [[b["index"].tolist() for b in take(
        EpisodeStream(SPEC, source="pool", seed=2, batch_size=batch, pool_size=pool, rank=r, world_size=world),
        steps, workers=workers if workers > 1 else 0)] for r in range(world)]
    ordered = [i for g in range(steps) for r in range(world) for i in per_rank[r][g]]
    epochs = [ordered[e * pool:(e + 1) * pool] for e in range(len(ordered) // pool)]
    assert len(epochs) >= 3 and all(sorted(e) == list(range(pool)) for e in epochs)
    assert ordered == resampled_indices(2, pool, 0, len(ordered)).tolist()


def test_pool_without_cache_gives_the_same_batches(monkeypatch):
    make = lambda: EpisodeStream(SPEC, source="pool", seed=2, batch_size=6, pool_size=9)
    expected = [make().batch(g) for g in range(4)]
    monkeypatch.setattr(stream_module, "POOL_CACHE_BYTES", 0)
    assert_batches_equal([make().batch(g) for g in range(4)], expected)


def test_shards_infinite_two_ranks_two_workers_no_duplicate_no_gap(shard_dir, small_spec):
    batch, world, episodes = 4, 2, 96  # 12 steps per rank = one epoch of the 96 episodes
    per_rank = [take(EpisodeStream(small_spec, source="shards", shards_dir=shard_dir, seed=9, batch_size=batch,
                                   rank=r, world_size=world), 12, workers=2) for r in range(world)]
    seen = [i for batches in per_rank for b in batches for i in b["index"].tolist()]
    assert sorted(seen) == list(range(episodes))
    b = per_rank[1][5]
    assert_batches_equal([b], [sample_episodes(small_spec, 7, b["index"])])  # shard seed is 7
    resumed = take(EpisodeStream(small_spec, source="shards", shards_dir=shard_dir, seed=9, batch_size=batch,
                                 rank=1, world_size=world, start_step=9), 5)
    assert indices(resumed[:3]) == indices(per_rank[1][9:12])
    assert indices(resumed[3:]) != indices(per_rank[1][:2])  # the second epoch is reshuffled


def test_shards_finite_two_ranks_two_workers_each_episode_once(shard_dir, small_spec):
    seen = []
    for rank in range(2):
        stream = EpisodeStream(small_spec, source="shards", shards_dir=shard_dir, seed=0, batch_size=5,
                               rank=rank, world_size=2, finite=True)
        batches = take(stream, 1000, workers=2)
        assert all(len(b["index"]) <= 5 for b in batches)
        seen += [i for b in batches for i in b["index"].tolist()]
    assert sorted(seen) == list(range(96))


def test_shards_finite_one_reader_reads_in_order_with_batches_across_shards(shard_dir, small_spec):
    stream = EpisodeStream(small_spec, source="shards", shards_dir=shard_dir, seed=0, batch_size=5, finite=True)
    batches = take(stream, 1000)
    assert [len(b["index"]) for b in batches] == [5] * 19 + [1]  # 96 episodes in shards of 12: batches span shards
    assert [i for b in indices(batches) for i in b] == list(range(96))
    assert_batches_equal([batches[2]], [sample_episodes(small_spec, 7, range(10, 15))])  # shard seed is 7


def test_fewer_shards_than_readers_is_a_clear_error(shard_dir, small_spec):
    stream = EpisodeStream(small_spec, source="shards", shards_dir=shard_dir, seed=0, batch_size=5,
                           rank=3, world_size=5, finite=True)
    with pytest.raises(DataError, match=r"8 shard\(s\) for 10 readers"):
        take(stream, 1, workers=2)


def test_shards_of_another_task_are_refused(shard_dir):
    with pytest.raises(DataError, match=r"manifest.json.*d: 4 != 8"):
        EpisodeStream(TaskSpec(k=3, d=8, n=32, separation=4.0), source="shards", shards_dir=shard_dir,
                      seed=0, batch_size=4)


def test_rank_defaults_and_bad_arguments(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert resolve_rank() == (1, 3) and resolve_rank(0, 2) == (0, 2)
    assert EpisodeStream(SPEC, seed=0, batch_size=2).batch(0)["index"].tolist() == [2, 3]
    with pytest.raises(ConfigError, match="rank"):
        resolve_rank(2, 2)
    with pytest.raises(ConfigError, match="data.pool_size"):
        EpisodeStream(SPEC, source="pool", seed=0, batch_size=2)
    with pytest.raises(ConfigError, match="data.source"):
        EpisodeStream(SPEC, source="web", seed=0, batch_size=2)
    with pytest.raises(ConfigError, match="data.shards_dir"):
        EpisodeStream(SPEC, source="shards", seed=0, batch_size=2)
    with pytest.raises(DataError, match="no such directory"):
        EpisodeStream(SPEC, source="shards", seed=0, batch_size=2, shards_dir="/nonexistent/shards")


def test_eval_sets():
    assert_batches_equal([eval_set(SPEC, 11, 5)], [sample_episodes(SPEC, 11, range(5))])
    fresh = load_run_config(BASE, ["task.n=16", "eval.episodes=6"])
    assert pool_eval_set(fresh.task, fresh.data, fresh.eval.episodes)["index"].tolist() == list(range(6))
    pool = load_run_config(BASE, ["task.n=16", "data.source=pool", "data.pool_size=4", "data.seed=3"])
    got = pool_eval_set(pool.task, pool.data, pool.eval.episodes)
    assert got["index"].tolist() == [0, 1, 2, 3] and got["seed"].eq(3).all()


def test_pool_eval_set_from_shards(shard_dir):
    cfg = load_run_config(BASE, ["task.d=4", "task.n=32", "data.source=shards", f"data.shards_dir={shard_dir}",
                                 "eval.episodes=10"])
    got = pool_eval_set(cfg.task, cfg.data, cfg.eval.episodes)
    assert got["index"].tolist() == list(range(10)) and got["seed"].eq(7).all()


def test_datamodule_uses_trainer_step_rank_and_world():
    from emformer.data.datamodule import EpisodeDataModule

    cfg = load_run_config(BASE, ["task.n=16", "data.batch_size=3", "data.num_workers=0"])
    module = EpisodeDataModule(cfg.task, cfg.data)
    module.trainer = SimpleNamespace(global_step=5, global_rank=1, world_size=2, accelerator=None)  # a CPU run
    first = next(iter(module.train_dataloader()))
    assert first["index"].tolist() == [(5 * 2 + 1) * 3 + b for b in range(3)]


@pytest.mark.parametrize("source", ["fresh", "pool"])
def test_two_ranks_two_workers_no_duplicate_no_gap(source):
    batch, world, steps, pool = 3, 2, 8, 24  # 8 steps x 2 ranks x 3 = 48 positions = 2 pool epochs
    seen = []
    for rank in range(world):
        stream = EpisodeStream(SPEC, source=source, seed=4, batch_size=batch, pool_size=pool, rank=rank,
                               world_size=world)
        seen.append([b["index"].tolist() for b in take(stream, steps, workers=2)])
    # global step g: rank 0 then rank 1 -> positions g*world*B .. (g+1)*world*B - 1
    ordered = [i for g in range(steps) for rank in range(world) for i in seen[rank][g]]
    if source == "fresh":
        assert ordered == list(range(steps * world * batch))
    else:
        assert sorted(ordered[:pool]) == list(range(pool)) and sorted(ordered[pool:]) == list(range(pool))


def test_packed_batches_keep_values_and_share_one_buffer():
    from emformer.data.stream import pack_batch

    batch = sample_episodes(TaskSpec(k=2, k_max=3, d=3, n=5, n_max=9), 0, range(4))
    packed = pack_batch(batch)
    for key, value in batch.items():
        assert packed[key].dtype == value.dtype and torch.equal(packed[key], value), key
    pointers = {v.untyped_storage().data_ptr() for v in packed.values()}
    assert len(pointers) == 1 and all(v.data_ptr() % 8 == 0 for v in packed.values())


def test_spectral_init_on_fresh_episodes_warns():
    with pytest.warns(UserWarning, match="data.source=shards"):
        EpisodeStream(TaskSpec(k=2, d=2, n=8, init="spectral"), seed=0, batch_size=2)


RANGED = TaskSpec(k=2, d=2, n=8, n_max=64)


def bucketed(**kwargs) -> EpisodeStream:
    return EpisodeStream(RANGED, **{"seed": 1, "batch_size": 4, "buckets": 3, **kwargs})


def test_buckets_split_like_one_rank_keep_resume_and_worker_counts():
    one = bucketed(batch_size=8)
    halves = [bucketed(rank=r, world_size=2) for r in range(2)]
    for g in range(4):
        whole, parts = one.batch(g), [h.batch(g) for h in halves]
        for key in EPISODE_KEYS:
            assert torch.equal(whole[key], torch.cat([p[key] for p in parts])), key
    make = lambda start=0: bucketed(rank=1, world_size=2, start_step=start)
    serial = take(make(), 7)
    assert_batches_equal(take(make(), 7, workers=2), serial)
    assert_batches_equal(take(make(start=4), 3, workers=2), serial[4:])
    assert_batches_equal(take(make(start=4), 3), serial[4:])


def test_each_batch_pads_only_to_its_bucket_and_n_keeps_the_task_law():
    specs, cumulative = stream_module.length_buckets(RANGED, 3)
    assert specs[0].n == 8 and specs[-1].n_max == 64
    assert all(a.n_max + 1 == b.n for a, b in zip(specs, specs[1:]))  # they tile the range
    # uniform n: a bucket's probability is its share of the integers
    assert torch.allclose(cumulative, torch.tensor([s.n_max - 7 for s in specs], dtype=torch.float64) / 57)
    stream, widths = bucketed(batch_size=16), set()
    for g in range(30):
        batch = stream.batch(g)
        bucket = specs[stream_module.bucket_of(cumulative, 1, g)]
        n = batch["mask"].sum(1)
        assert batch["points"].shape[1] == bucket.n_max
        assert bool(((n >= bucket.n) & (n <= bucket.n_max)).all())
        widths.add(batch["points"].shape[1])
    assert widths == {s.n_max for s in specs}  # every bucket is drawn
    # batches take each bucket as often as the task's n falls in it (SE of a share over 3,000 draws < 0.01)
    drawn = torch.tensor([stream_module.bucket_of(cumulative, 1, g) for g in range(3000)])
    shares = torch.bincount(drawn, minlength=len(specs)).double() / len(drawn)
    assert torch.allclose(shares.cumsum(0), cumulative, atol=0.03)


def test_log_uniform_buckets_weigh_by_log_length():
    spec = TaskSpec(k=2, d=2, n=32, n_max=1023, n_log=True)
    specs, cumulative = stream_module.length_buckets(spec, 5)
    logs = torch.log(torch.tensor([s.n_max + 1 for s in specs], dtype=torch.float64) / 32) / math.log(1024 / 32)
    assert torch.allclose(cumulative, logs)
    assert [s.n for s in specs] == [32, 64, 128, 256, 512]  # geometric: each bucket doubles n


def test_bad_buckets_are_one_line_errors():
    with pytest.raises(ConfigError, match="data.buckets: expected 0 with a fixed n"):
        EpisodeStream(SPEC, seed=0, batch_size=4, buckets=3)
    with pytest.raises(ConfigError, match="data.buckets: expected 0 unless data.source=fresh"):
        EpisodeStream(RANGED, source="pool", pool_size=8, seed=0, batch_size=4, buckets=3)
    with pytest.raises(ConfigError, match="data.buckets: expected 0 \\(off\\) or an integer >= 2"):
        bucketed(buckets=1)


def test_buckets_off_is_todays_stream():
    assert_batches_equal([bucketed(buckets=0).batch(2)], [sample_episodes(RANGED, 1, range(8, 12))])
