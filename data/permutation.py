"""A keyed bijection of range(N): the epoch order of a finite pool, at a per-index cost that does not grow with N.

Epoch e of a pool visits pool episode perm_e(p) at position p (0 <= p < N). Materialising perm_e costs O(N) time
and memory per epoch and per DataLoader worker (at N = 2^26, half a GiB for one permutation); a batch needs only
B of its values. `KeyedPermutation` computes perm_e(p) for just those positions:

- a Feistel network on `bits = ceil(log2 N)` bits, split into a high half of ceil(bits/2) and a low half of
  floor(bits/2) bits; round r XORs one half with a keyed hash of the other (even rounds the high half, odd
  rounds the low half). Each round is its own inverse, so the network is a bijection of range(2^bits) for any
  keys; the round function is murmur3's 64-bit finaliser of (half + round key).
- cycle walking: while a value lands in [N, 2^bits), apply the network again. Walking from p stays on p's
  cycle of the network, whose values in [0, N) the walk visits in order, so the result is a bijection of
  range(N). 2^bits < 2N, so a value needs fewer than 2 passes on average.

The round keys come from numpy's SeedSequence of (seed, epoch, tag), so the order is a pure function of
(seed, epoch, N), reproducible on every platform (uint64 arithmetic wraps identically everywhere).
"""
from __future__ import annotations

import functools

import numpy as np

ROUNDS = 8  # alternating: 4 rounds rewrite each half
_TAG = 0x5045524D  # keeps these keys apart from the episodes' Philox keys (seed, index)
_M1, _M2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)


def _mix(values: np.ndarray, key: np.uint64) -> np.ndarray:
    """murmur3's fmix64 of values + key (uint64, wrapping): every input bit affects every output bit."""
    z = values + key
    z ^= z >> _S33
    z *= _M1
    z ^= z >> _S33
    z *= _M2
    z ^= z >> _S33
    return z


@functools.lru_cache(maxsize=256)
def _round_keys(seed: int, epoch: int) -> tuple[np.uint64, ...]:
    state = np.random.SeedSequence([int(seed), int(epoch), _TAG]).generate_state(ROUNDS, dtype=np.uint64)
    return tuple(np.uint64(k) for k in state)


class KeyedPermutation:
    """perm(p) for 0 <= p < size: a bijection of range(size) fixed by (seed, epoch); see the module doc."""

    def __init__(self, seed: int, epoch: int, size: int) -> None:
        if size < 1:
            raise ValueError(f"size: expected an integer >= 1, got {size!r}")
        self.size = int(size)
        bits = (self.size - 1).bit_length()
        self._low_bits = np.uint64(bits // 2)
        self._high_mask = np.uint64((1 << (bits - bits // 2)) - 1)
        self._low_mask = np.uint64((1 << (bits // 2)) - 1)
        self._keys = _round_keys(seed, epoch)

    def _network(self, x: np.ndarray) -> np.ndarray:
        high, low = x >> self._low_bits, x & self._low_mask
        for r, key in enumerate(self._keys):
            if r % 2 == 0:
                high ^= _mix(low, key) & self._high_mask
            else:
                low ^= _mix(high, key) & self._low_mask
        return (high << self._low_bits) | low

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """perm(positions), int64; every position must be in [0, size)."""
        x = self._network(np.asarray(positions, dtype=np.uint64))
        outside = np.flatnonzero(x >= self.size)
        while outside.size:  # cycle walking: fewer than 2 passes per value on average
            x[outside] = self._network(x[outside])
            outside = outside[x[outside] >= self.size]
        return x.astype(np.int64)


def keyed_uniform(tag: int, seed: int, step: int) -> float:
    """A uniform float in [0, 1) that is a pure function of (tag, seed, step), the same on every platform: a
    per-batch choice (its length bucket, its number of passes) that exact resume and any split over ranks
    and workers reproduce. 53 bits of SeedSequence((tag, seed, step))'s state."""
    words = np.random.SeedSequence((int(tag), int(seed), int(step))).generate_state(2, dtype=np.uint32)
    return float((int(words[0]) << 21 | int(words[1]) >> 11) / 2.0**53)
