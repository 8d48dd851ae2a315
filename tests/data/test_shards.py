"""`emformer generate`: deterministic bytes, resumable writing, and a manifest that catches every bad shard."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from emformer.data.episodes import EPISODE_KEYS, sample_episodes
from emformer.data.shards import (MANIFEST, PARTIAL, EpisodeCodec, ShardReader, encode_episode, verify_shards,
                                  write_shards)
from emformer.data.tasks import TaskSpec
from emformer.errors import ConfigError, DataError
from emformer.train.cli import main as cli_main

SHARD_EPISODES, SHARD_SIZE = 96, 12  # the session's shard set (conftest.py)

BASE = Path(__file__).resolve().parents[2] / "configs" / "base.yaml"
TINY = TaskSpec(k=2, d=2, n=8)


def shard_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("shard-*.tar"))}


def test_parallel_and_serial_writing_give_identical_bytes(tmp_path):
    serial = write_shards(TINY, 3, tmp_path / "serial", 50, 10, workers=1, progress=False)
    parallel = write_shards(TINY, 3, tmp_path / "parallel", 50, 10, workers=2, progress=False)
    assert serial == parallel and len(serial["shards"]) == 5
    assert shard_files(tmp_path / "serial") == shard_files(tmp_path / "parallel")
    assert (tmp_path / "serial" / MANIFEST).read_bytes() == (tmp_path / "parallel" / MANIFEST).read_bytes()
    assert not (tmp_path / "parallel" / PARTIAL).exists()


def test_shards_hold_exactly_the_episodes(shard_dir, small_spec):
    manifest = json.loads((shard_dir / MANIFEST).read_text())
    assert manifest["seed"] == 7 and manifest["episodes"] == SHARD_EPISODES and manifest["spec"] == small_spec.to_dict()
    assert [(r["start"], r["stop"], r["count"]) for r in manifest["shards"]] == [
        (lo, lo + SHARD_SIZE, SHARD_SIZE) for lo in range(0, SHARD_EPISODES, SHARD_SIZE)]
    with tarfile.open(shard_dir / manifest["shards"][1]["file"]) as tar:
        members = tar.getmembers()
    assert [m.name for m in members][:2] == ["0000000012.safetensors", "0000000013.safetensors"]
    assert {(m.mtime, m.uid, m.gid, m.uname) for m in members} == {(0, 0, 0, "emformer")}
    reader = ShardReader(shard_dir, spec=small_spec)
    got, want = reader.read([0, 13, 95, 40]), sample_episodes(small_spec, 7, [0, 13, 95, 40])
    for key in EPISODE_KEYS:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("spec", [TINY, TaskSpec(k=2, k_max=3, d=2, d_max=3, n=6, n_max=9, noise="diagonal")])
def test_batched_codec_writes_exactly_safetensors_bytes(spec):
    from safetensors.torch import load

    batch = sample_episodes(spec, 1, range(6))
    codec = EpisodeCodec.for_batch(batch)
    records = codec.encode(batch)
    assert records == [encode_episode(batch, row) for row in range(6)]
    decoded = codec.decode(records)
    for key in EPISODE_KEYS:
        assert torch.equal(decoded[key], batch[key]) and torch.equal(load(records[2])[key], batch[key][2]), key


def test_rerun_is_a_no_op(tmp_path):
    out = tmp_path / "set"
    first = write_shards(TINY, 0, out, 30, 10, progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert write_shards(TINY, 0, out, 30, 10, workers=2, progress=False) == first
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps  # manifest included


@pytest.mark.parametrize("spec,episodes,sha256", [
    (TINY, (0, 7), "2cbc0e9e656bfac71b7b402aa039297020c066674219ada2e51990679a718ec4"),
    (TaskSpec(k=2, k_max=3, d=2, n=5, n_max=40), (3, 9),
     "7a5a4ece83914f00daff0e057f20471d75354863a0f4878d0a6f34f9578bd1f6")])
def test_shard_bytes_are_those_of_their_format_version(spec, episodes, sha256):
    """Shard bytes are pinned per format version (recorded at FORMAT_VERSION 5; re-recorded whenever the
    episodes change): TarWriter's layout and the record codec stay byte-stable."""
    import hashlib

    from emformer.data.shards import FORMAT_VERSION, shard_bytes

    assert FORMAT_VERSION == 5 and hashlib.sha256(shard_bytes(spec, 7, *episodes)).hexdigest() == sha256


def test_webdataset_reads_the_shards(shard_dir, small_spec):
    import webdataset as wds
    from safetensors.torch import load

    samples = list(wds.WebDataset(str(shard_dir / "shard-000001.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"{i:010d}" for i in range(12, 24)]
    want = sample_episodes(small_spec, 7, [12])
    assert all(torch.equal(load(samples[0]["safetensors"])[key], want[key][0]) for key in EPISODE_KEYS)


def test_half_written_shards_are_rewritten(tmp_path):
    out = tmp_path / "set"
    write_shards(TINY, 0, out, 40, 10, progress=False)
    good = shard_files(out)
    # a killed run: shard 1 truncated, shard 2 missing, a temp file left behind, no final manifest yet
    (out / "shard-000001.tar").write_bytes(good["shard-000001.tar"][:700])
    (out / "shard-000002.tar").unlink()
    (out / ".shard-000003.tar.abc123.tmp").write_bytes(b"partial")
    manifest = json.loads((out / MANIFEST).read_text())
    (out / PARTIAL).write_text(json.dumps(manifest))
    (out / MANIFEST).unlink()
    with pytest.raises(DataError, match="unfinished"):
        verify_shards(out)
    write_shards(TINY, 0, out, 40, 10, workers=2, progress=False)
    assert shard_files(out) == good
    assert not list(out.glob("*.tmp")) and not (out / PARTIAL).exists()
    verify_shards(out, TINY)
    # same-size corruption under a complete manifest is caught by the sha256 and repaired
    data = bytearray(good["shard-000000.tar"])
    data[600] ^= 0xFF
    (out / "shard-000000.tar").write_bytes(bytes(data))
    write_shards(TINY, 0, out, 40, 10, progress=False)
    assert shard_files(out) == good


@pytest.mark.parametrize("change,named", [({"spec": TaskSpec(k=2, d=2, n=9)}, "n: 8 != 9"),
                                          ({"seed": 1}, "seed: 0 != 1"),
                                          ({"episodes": 50}, "episodes")])
def test_a_different_shard_set_is_refused(tmp_path, change, named):
    out = tmp_path / "set"
    write_shards(TINY, 0, out, 20, 10, progress=False)
    args = {"spec": TINY, "seed": 0, "episodes": 20} | change
    with pytest.raises(DataError, match=named) as err:
        write_shards(args["spec"], args["seed"], out, args["episodes"], 10, progress=False)
    assert str(out / MANIFEST) in str(err.value)


@pytest.mark.parametrize("kwargs,key", [({"episodes": 0}, "--episodes"), ({"shard_size": 0}, "--shard-size"),
                                        ({"workers": 0}, "--workers")])
def test_bad_generate_arguments(tmp_path, kwargs, key):
    args = {"episodes": 10, "shard_size": 5, "workers": 1} | kwargs
    with pytest.raises(ConfigError, match=key):
        write_shards(TINY, 0, tmp_path / "x", progress=False, **args)


@pytest.fixture()
def copy(shard_dir, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(shard_dir, target)
    return target


def test_reader_errors_name_the_file(tmp_path, copy, small_spec):
    with pytest.raises(DataError, match="no such directory"):
        ShardReader(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty.*manifest.json: missing \(the directory is empty\)"):
        ShardReader(tmp_path / "empty")
    with pytest.raises(DataError, match=r"manifest.json: shards were generated for another task.*n: 32 != 64"):
        ShardReader(copy, spec=TaskSpec(k=3, d=4, n=64, separation=4.0))
    shard = copy / "shard-000002.tar"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard-000002.tar: sha256 does not match"):
        ShardReader(copy, spec=small_spec)
    shard.write_bytes(bytes(data[:2048]))
    with pytest.raises(DataError, match=r"shard-000002.tar: 2048 bytes, manifest says"):
        ShardReader(copy)
    shard.unlink()
    with pytest.raises(DataError, match=r"shard-000002.tar: shard listed in .* is missing"):
        ShardReader(copy)
    (copy / MANIFEST).write_text("{not json")
    with pytest.raises(DataError, match=r"manifest.json: not a readable JSON manifest"):
        ShardReader(copy)


def test_corrupt_member_is_a_data_error(copy):
    shard = copy / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[520:560] = b"\xff" * 40  # inside the first member's safetensors header (data starts at 512)
    shard.write_bytes(bytes(data))
    reader = ShardReader(copy, verify=False)
    with pytest.raises(DataError, match="shard-000000.tar"):
        reader.read([0])


def test_generate_command(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["generate", str(BASE), "task.k=2", "task.d=2", "task.n=8", "data.seed=4", "--out", str(out),
            "--episodes", "12", "--shard-size", "5", "--workers", "2", "--no-progress"]
    assert cli_main(argv) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["seed"] == 4 and [r["count"] for r in manifest["shards"]] == [5, 5, 2]
    assert cli_main(argv + ["--seed", "5"]) == 2
    assert "seed: 4 != 5" in capsys.readouterr().err
    assert cli_main(["generate", str(BASE), "task.kk=2", "--out", str(out), "--episodes", "3"]) == 2
    assert "task.kk" in capsys.readouterr().err
    assert cli_main(["generate", str(BASE), "--out", str(tmp_path / "z"), "--episodes", "0"]) == 2
    assert "--episodes" in capsys.readouterr().err


def test_data_modules_do_not_import_lightning():
    code = ("import sys, emformer.data.shards, emformer.data.stream, emformer.train.cli; "
            "assert 'lightning' not in sys.modules and 'pytorch_lightning' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_misplaced_or_extra_members_are_data_errors(copy):
    import io

    shard = copy / "shard-000003.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]

    def rewrite(pairs):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for info, data in pairs:
                tar.addfile(info, io.BytesIO(data))
        shard.write_bytes(buffer.getvalue())
        return ShardReader(copy, verify=False)  # the sha256 would catch it first: test the reader's own checks

    swapped = rewrite([members[1], members[0]] + members[2:])  # two episodes swapped
    with pytest.raises(DataError, match=r"shard-000003.tar: members do not match episodes 36..47"):
        swapped.read([36])
    extra = tarfile.TarInfo("0000009999.safetensors")
    extra.size = 3
    longer = rewrite(members + [(extra, b"abc")])
    with pytest.raises(DataError, match=r"shard-000003.tar: members do not match episodes 36..47"):
        longer.read([40])
    # the finite sequential reader checks each shard's members the same way
    renamed = members[0][0]
    renamed.name = "0000000099.safetensors"
    mislabeled = rewrite([(renamed, members[0][1])] + members[1:])
    with pytest.raises(DataError, match=r"shard-000003.tar: members do not match episodes 36..47"):
        list(mislabeled.iter_finite(0, 1, 0, 1, 4))
