"""Episodes written to webdataset tar shards with a manifest, and the shard reader.

Layout of an output directory:

    shard-000000.tar ...   webdataset tar shards; sample key = the episode index, zero-padded to 10 digits,
                           one member `<key>.safetensors` per episode holding every tensor of
                           `sample_episodes` (EPISODE_KEYS) without the batch dimension, padded to the spec.
    manifest.json          written atomically, last: format version, spec (TaskSpec.to_dict), seed, episodes,
                           shard_size, and per shard {file, start, stop (exclusive), count, sha256, bytes}.
    manifest.partial.json  progress of an unfinished run (same fields, shards completed so far, saved at most
                           every PROGRESS_SECONDS); removed at the end.

Shard j holds episodes [j*S, min((j+1)*S, N)) of the seed, so its bytes depend only on (spec, seed, j, S, N):
shards are written in parallel by a process pool, each to a temporary name and renamed when complete, with
fixed tar metadata (mtime 0, uid/gid 0, uname/gname "emformer"), so parallel and serial runs give identical
bytes. A rerun with the same arguments skips every shard whose size and sha256 match its record, rewrites a
missing or half-written one, and refuses a directory holding another spec or seed.

Written and read through webdataset (no lightning here):

- writing: webdataset's TarWriter, with fixed TAR_META and member order, so a shard's bytes are a function of
  its episodes alone;
- random access (the training stream's pool of exactly N episodes): wids' indexed tar reader
  (`IndexedTarSamples`: one header scan and an mmap per shard and process). Not wids' `ShardListDataset`:
  it opens each shard through its download cache, which copies a shard that is not at its cache name and
  creates `<shard>.lock` beside it (a read-only shared directory fails), and keeps only `lru_size` shards open;
- the finite sequential stream: the same indexed reader, shard by shard (shards split by rank then by worker, as
  webdataset's split_by_node / split_by_worker). Not webdataset's `WebDataset` pipeline: its per-member
  Python (tarfile iteration, a dict per sample) is several times slower than the indexed reader, too slow to
  stay 20x ahead of a training step on one core (BENCHMARKS.md, data section).

Hand-built on purpose, and only this: `EpisodeCodec`, the batched safetensors encoding of a whole batch
(safetensors' own save/load runs Python per episode, which caps random reads below 20x what a training step
consumes per core; BENCHMARKS.md, data section, has the "safetensors decode per episode" row).
"""
from __future__ import annotations

import bisect
import hashlib
import io
import json
import math
import os
import struct
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from webdataset.writer import TarWriter
from wids.wids import IndexedTarSamples  # wids' indexed tar reader (ShardListDataset: see the module doc)

from emformer.atomic import atomic_write, atomic_write_json, sha256_file
from emformer.data.episodes import EPISODE_KEYS, Batch, sample_episodes
from emformer.data.tasks import TaskSpec
from emformer.errors import ConfigError, DataError
from emformer.memory import keep_freed_memory

FORMAT = "emformer-shards"
FORMAT_VERSION = 5  # the record layout and the episodes it holds: follows tasks.EPISODES_VERSION
MANIFEST = "manifest.json"
PARTIAL = "manifest.partial.json"
SAMPLE_EXT = "safetensors"
TAR_META = {"user": "emformer", "group": "emformer", "mode": 0o444, "mtime": 0}  # int: a float mtime costs a PAX header per member
_CHUNK = 256  # episodes generated per sample_episodes call inside one shard
PROGRESS_SECONDS = 2.0  # manifest.partial.json is rewritten at most this often while shards complete


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}.tar"


def episode_key(index: int) -> str:
    return f"{index:010d}"


# ====================================================================== writing
def encode_episode(batch: Batch, row: int) -> bytes:
    """One episode of a batch as safetensors bytes (the reference encoding; EpisodeCodec is the fast path)."""
    from safetensors.torch import save

    return save({key: batch[key][row].clone() for key in EPISODE_KEYS})


_NUMPY_DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32, "BOOL": np.bool_,
                 "U8": np.uint8, "F16": np.float16, "I16": np.int16, "I8": np.int8}


class EpisodeCodec:
    """Batched safetensors encoding for episodes that share one layout (every episode of a spec does).

    Calling safetensors per episode runs Python per episode; here the header is built once and the bytes of a
    whole batch are cut from / pasted into one [B, record] byte array per tensor. The bytes are exactly what
    `encode_episode` writes (tested), so any safetensors reader can read a member.
    """

    def __init__(self, record: bytes) -> None:
        header_len = int.from_bytes(record[:8], "little")
        self.prefix = np.frombuffer(record[:8 + header_len], dtype=np.uint8)
        self.size = len(record)
        header = json.loads(record[8:8 + header_len])
        header.pop("__metadata__", None)
        self.fields = {key: (_NUMPY_DTYPES.get(value["dtype"]), tuple(value["shape"]),
                             8 + header_len + value["data_offsets"][0], 8 + header_len + value["data_offsets"][1])
                       for key, value in header.items()}
        if set(self.fields) != set(EPISODE_KEYS) or any(dtype is None for dtype, *_ in self.fields.values()):
            raise ValueError(f"episode record holds {sorted(self.fields)}, expected {sorted(EPISODE_KEYS)}")

    @classmethod
    def for_batch(cls, batch: Batch) -> "EpisodeCodec":
        return cls(encode_episode(batch, 0))

    def matches(self, batch: Batch) -> bool:
        """Whether every episode of `batch` has this layout (same keys, dtypes and shapes)."""
        return all(tuple(batch[key].shape[1:]) == shape and batch[key].numpy().dtype == dtype
                   for key, (dtype, shape, _, _) in self.fields.items())

    def encode(self, batch: Batch) -> list[bytes]:
        rows = batch["index"].shape[0]
        buffer = np.zeros((rows, self.size), dtype=np.uint8)
        buffer[:, :len(self.prefix)] = self.prefix
        for key, (_, _, begin, end) in self.fields.items():
            buffer[:, begin:end] = np.ascontiguousarray(batch[key].numpy()).reshape(rows, -1).view(np.uint8)
        return [row.tobytes() for row in buffer]

    def decode(self, records: Sequence[bytes]) -> Optional[Batch]:
        """The batch of these records, or None if one of them has another layout (caller falls back)."""
        if any(len(r) != self.size for r in records):
            return None
        buffer = np.frombuffer(b"".join(records), dtype=np.uint8).reshape(len(records), self.size)
        if not (buffer[:, :len(self.prefix)] == self.prefix).all():
            return None
        return {key: torch.from_numpy(buffer[:, begin:end].copy().view(dtype).reshape(len(records), *shape))
                for key, (dtype, shape, begin, end) in self.fields.items()}


def shard_bytes(spec: TaskSpec, seed: int, start: int, stop: int) -> bytes:
    """The complete tar file of episodes [start, stop) of `seed`, written by webdataset's TarWriter."""
    buffer = io.BytesIO()
    codec: Optional[EpisodeCodec] = None
    with TarWriter(buffer, encoder=False, **TAR_META) as tar:
        for lo in range(start, stop, _CHUNK):
            batch = sample_episodes(spec, seed, range(lo, min(lo + _CHUNK, stop)))
            if codec is None or not codec.matches(batch):
                codec = EpisodeCodec.for_batch(batch)
            for index, record in zip(batch["index"].tolist(), codec.encode(batch)):
                tar.write({"__key__": episode_key(index), SAMPLE_EXT: record})
    return buffer.getvalue()


def write_shard(spec_dict: dict[str, Any], seed: int, out: str, shard: int, start: int, stop: int) -> dict[str, Any]:
    """Write one shard atomically (temp name, then rename); return its manifest record. Runs in a pool worker."""
    torch.set_num_threads(1)  # the pool's processes share the cores; one thread each
    keep_freed_memory()
    data = shard_bytes(TaskSpec.from_dict(spec_dict), seed, start, stop)
    name = shard_name(shard)
    def write(tmp: Path) -> None:
        tmp.write_bytes(data)
        tmp.chmod(0o644)  # mkstemp's 0600 would hide shards from other users of a shared directory

    atomic_write(Path(out) / name, write)
    return {"file": name, "start": start, "stop": stop, "count": stop - start,
            "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def plan(spec: TaskSpec, seed: int, episodes: int, shard_size: int) -> dict[str, Any]:
    """The manifest fields that identify a shard set (everything but the per-shard records)."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "spec": spec.to_dict(), "seed": int(seed),
            "episodes": int(episodes), "shard_size": int(shard_size), "sample": SAMPLE_EXT,
            "keys": list(EPISODE_KEYS)}


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{key}: {old.get(key, '<missing>')!r} != {new.get(key, '<missing>')!r}" for key in keys
            if old.get(key) != new.get(key)]


def _existing_records(out: Path, wanted: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Shard records of a previous run into `out` with the same plan; DataError if it planned something else."""
    for name in (MANIFEST, PARTIAL):
        path = out / name
        if not path.exists():
            continue
        old = _load_json(path)
        old_plan = {key: old.get(key) for key in wanted}
        if old_plan != wanted:
            diffs = _differences(old_plan["spec"] or {}, wanted["spec"]) if old_plan["spec"] != wanted["spec"] else []
            diffs += [f"{key}: {old_plan[key]!r} != {wanted[key]!r}" for key in wanted
                      if key != "spec" and old_plan[key] != wanted[key]]
            raise DataError(f"{path}: the directory holds a different shard set (existing != requested: "
                            f"{'; '.join(diffs)}); "
                            f"refusing to mix them: use another --out or delete {out}")
        return {rec["file"]: rec for rec in old.get("shards", [])}
    return {}


def _record_ok(out: Path, record: dict[str, Any]) -> bool:
    path = out / record["file"]
    return path.is_file() and path.stat().st_size == record["bytes"] and sha256_file(path) == record["sha256"]


def write_shards(spec: TaskSpec, seed: int, out: str | Path, episodes: int, shard_size: int, workers: int = 1,
                 progress: bool = True) -> dict[str, Any]:
    """Write (or complete) the shard set of episodes [0, episodes) of `seed`; return the manifest.

    Complete shards of an earlier run with the same arguments are kept (size and sha256 checked); missing or
    half-written ones are (re)written by `workers` processes; manifest.json is written atomically last.
    """
    spec.validate()
    if spec.noise == "mixed":
        raise ConfigError("task.noise: mixed noise cannot be written to shards (an episode record holds no noise "
                          "mode, which the oracle needs); train on it with data.source=fresh")
    for key, value, least in (("--episodes", episodes, 1), ("--shard-size", shard_size, 1), ("--workers", workers, 1)):
        if not (isinstance(value, int) and value >= least):
            raise ConfigError(f"{key}: expected an integer >= {least}, got {value!r}")
    if seed < 0:
        raise ConfigError(f"--seed: expected an integer >= 0, got {seed!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    wanted = plan(spec, seed, episodes, shard_size)
    previous = _existing_records(out, wanted)
    for stale in out.glob(".shard-*.tmp"):  # temp files of a killed run: never complete
        stale.unlink(missing_ok=True)

    ranges = [(j, lo, min(lo + shard_size, episodes)) for j, lo in enumerate(range(0, episodes, shard_size))]
    records: dict[int, dict[str, Any]] = {}
    todo = []
    for j, lo, hi in ranges:
        record = previous.get(shard_name(j))
        if record is not None and (record["start"], record["stop"]) == (lo, hi) and _record_ok(out, record):
            records[j] = record
        else:
            todo.append((j, lo, hi))

    last_save = [-math.inf]

    def save_progress(force: bool = False) -> None:
        # Records of finished shards let a rerun after a kill skip them; a shard missing from the record is
        # only rewritten. Rewriting the whole list after each of thousands of shards would cost O(shards²)
        # bytes and an fsync per shard: save at most every PROGRESS_SECONDS.
        if force or time.monotonic() - last_save[0] >= PROGRESS_SECONDS:
            atomic_write_json(out / PARTIAL, {**wanted, "shards": [records[j] for j in sorted(records)]})
            last_save[0] = time.monotonic()

    from tqdm import tqdm

    # mininterval: one refresh a second keeps a SLURM log (no terminal, no carriage returns) readable
    bar = tqdm(total=episodes, initial=sum(r["count"] for r in records.values()), unit="ep",
               desc=f"generate {out.name}", disable=not progress, dynamic_ncols=True, mininterval=1.0)
    try:
        if todo:
            save_progress(force=True)
        if workers == 1 or len(todo) <= 1:
            for j, lo, hi in todo:
                records[j] = write_shard(spec.to_dict(), seed, str(out), j, lo, hi)
                save_progress()
                bar.update(hi - lo)
        else:
            with ProcessPoolExecutor(max_workers=min(workers, len(todo))) as pool:
                futures = {pool.submit(write_shard, spec.to_dict(), seed, str(out), j, lo, hi): j for j, lo, hi in todo}
                for future in as_completed(futures):
                    records[futures[future]] = future.result()
                    save_progress()
                    bar.update(records[futures[future]]["count"])
    finally:
        bar.close()
    manifest = {**wanted, "shards": [records[j] for j, _, _ in ranges]}
    if todo or not (out / MANIFEST).is_file() or _load_json(out / MANIFEST) != manifest:
        atomic_write_json(out / MANIFEST, manifest)  # a complete rerun touches nothing, the manifest included
    (out / PARTIAL).unlink(missing_ok=True)
    return manifest


# ====================================================================== reading
def _load_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable JSON manifest ({exc})") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object")
    return value


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a shard directory, checked for format; DataError naming the file otherwise."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"data.shards_dir {directory}: no such directory")
    path = directory / MANIFEST
    if not path.is_file():
        if (directory / PARTIAL).is_file():
            raise DataError(f"{path}: missing; {directory / PARTIAL} shows an unfinished `emformer generate`: "
                            "rerun it with the same arguments to complete the shards")
        what = "the directory is empty" if not any(directory.iterdir()) else "no manifest"
        raise DataError(f"{path}: missing ({what}); write shards with `emformer generate CONFIG --out {directory}`")
    manifest = _load_json(path)
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: expected format {FORMAT!r} version {FORMAT_VERSION}, got "
                        f"{manifest.get('format')!r} version {manifest.get('format_version')!r}")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards:
        raise DataError(f"{path}: lists no shards")
    expected = 0
    for record in shards:
        if not isinstance(record, dict) or record.get("start") != expected or \
                record.get("stop", -1) - record.get("start", 0) != record.get("count"):
            raise DataError(f"{path}: shard record {record!r} breaks the contiguous episode ranges (expected start {expected})")
        expected = record["stop"]
    if expected != manifest.get("episodes"):
        raise DataError(f"{path}: shards cover {expected} episodes, manifest says {manifest.get('episodes')}")
    return manifest


_VERIFIED: set[tuple[str, int, int, str]] = set()  # (path, size, mtime_ns, sha256) already hashed in this process


def verify_shards(directory: str | Path, spec: Optional[TaskSpec] = None) -> dict[str, Any]:
    """Read the manifest, check it agrees with `spec`, and check every shard's size and sha256 (once per process)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if spec is not None and manifest["spec"] != spec.to_dict():
        diffs = _differences(manifest["spec"], spec.to_dict())
        raise DataError(f"{directory / MANIFEST}: shards were generated for another task; differing keys "
                        f"(manifest != config): {'; '.join(diffs)}")
    for record in manifest["shards"]:
        path = directory / record["file"]
        if not path.is_file():
            raise DataError(f"{path}: shard listed in {directory / MANIFEST} is missing")
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, record["sha256"])
        if key in _VERIFIED:
            continue
        if stat.st_size != record["bytes"]:
            raise DataError(f"{path}: {stat.st_size} bytes, manifest says {record['bytes']} (truncated or corrupt shard)")
        if sha256_file(path) != record["sha256"]:
            raise DataError(f"{path}: sha256 does not match {directory / MANIFEST} (corrupt or replaced shard)")
        _VERIFIED.add(key)
    return manifest


def _decode(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise DataError(f"{path}: corrupt episode record ({exc})") from None


def _stack(path: Path, episodes: list[dict[str, torch.Tensor]]) -> Batch:
    try:
        return {key: torch.stack([ep[key] for ep in episodes]) for key in EPISODE_KEYS}
    except (KeyError, RuntimeError) as exc:
        raise DataError(f"{path}: episode records lack or mis-shape a tensor ({exc})") from None


class ShardReader:
    """The episodes of a verified shard directory through wids' indexed tar reader: random access, and the finite
    sequential stream.

    Each process indexes a shard on first use (wids scans the member headers and mmaps the file); the index is
    per process (dropped when pickled, rebuilt after a fork), so DataLoader workers never share one.
    """

    def __init__(self, directory: str | Path, spec: Optional[TaskSpec] = None, verify: bool = True) -> None:
        self.directory = Path(directory)
        self.manifest = verify_shards(self.directory, spec) if verify else read_manifest(self.directory)
        self.records = self.manifest["shards"]
        self.episodes = int(self.manifest["episodes"])
        self._starts = [r["start"] for r in self.records]
        self._tars: dict[int, IndexedTarSamples] = {}
        self._pid = os.getpid()
        self._codec: Optional[EpisodeCodec] = None

    def __getstate__(self) -> dict[str, Any]:  # open files and indexes are per process
        return {**self.__dict__, "_tars": {}}

    def path(self, shard: int) -> Path:
        return self.directory / self.records[shard]["file"]

    def _tar(self, shard: int) -> IndexedTarSamples:
        """wids' index of a shard, checked against the manifest: one sample per episode, in episode order."""
        if self._pid != os.getpid():  # forked: the parent's open files are not ours to use
            self._tars, self._pid = {}, os.getpid()
        if shard not in self._tars:
            path, record = self.path(shard), self.records[shard]
            try:
                tar = IndexedTarSamples(path=str(path))
            except (OSError, ValueError, UnicodeDecodeError, struct.error) as exc:
                raise DataError(f"{path}: not a readable tar shard ({exc})") from None
            names = [tar.reader.by_index[i][0] for group in tar.samples for i in group]
            if names != [f"{episode_key(i)}.{SAMPLE_EXT}" for i in range(record["start"], record["stop"])]:
                tar.close()
                raise DataError(f"{path}: members do not match episodes {record['start']}..{record['stop'] - 1} "
                                f"of {self.directory / MANIFEST} (corrupt shard)")
            self._tars[shard] = tar
        return self._tars[shard]

    def read(self, indices: torch.Tensor | Sequence[int]) -> Batch:
        """Episodes `indices` as one batch (the layout of sample_episodes)."""
        rows = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
        return self._batch([self._record(int(i)) for i in rows])

    def _record(self, index: int) -> tuple[Path, bytes]:
        if not 0 <= index < self.episodes:
            raise IndexError(f"episode {index} outside 0..{self.episodes - 1} of {self.directory}")
        shard = bisect.bisect_right(self._starts, index) - 1
        sample = self._tar(shard)[index - self._starts[shard]]
        return self.path(shard), sample[f".{SAMPLE_EXT}"].getvalue()

    def _batch(self, records: list[tuple[Path, bytes]]) -> Batch:
        """Decode records of one layout in one go; records of another layout go through safetensors one by one."""
        if self._codec is None:
            try:
                self._codec = EpisodeCodec(records[0][1])
            except (ValueError, KeyError, UnicodeDecodeError) as exc:
                raise DataError(f"{records[0][0]}: corrupt episode record ({exc})") from None
        batch = self._codec.decode([data for _, data in records])
        if batch is not None:
            return batch
        return _stack(records[0][0], [_decode(path, data) for path, data in records])

    def iter_finite(self, rank: int, world: int, worker: int, workers: int, batch_size: int) -> Iterator[Batch]:
        """Each episode of this (rank, DataLoader worker)'s shards, once, in shard order, as batches of batch_size
        (a batch may span two shards; the last one may be smaller). Shards are split by rank, then by worker, as
        webdataset's split_by_node / split_by_worker do; the set is fixed (no shuffling)."""
        if len(self.records) < world * workers:
            raise DataError(f"{self.directory}: {len(self.records)} shard(s) for {world * workers} readers "
                            f"(ranks x dataloader workers): each reader needs at least one shard; write more, "
                            f"smaller shards (--shard-size) or use fewer workers")
        mine = list(range(len(self.records)))[rank::world][worker::workers]
        pending: list[tuple[Path, bytes]] = []
        for shard in mine:
            path, tar = self.path(shard), self._tar(shard)
            for j in range(len(tar)):
                pending.append((path, tar[j][f".{SAMPLE_EXT}"].getvalue()))
                if len(pending) == batch_size:
                    yield self._batch(pending)
                    pending = []
        if pending:
            yield self._batch(pending)

    def close(self) -> None:
        for tar in self._tars.values():
            tar.close()
        self._tars = {}

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            try:
                self.close()
            except (OSError, ValueError):
                pass
