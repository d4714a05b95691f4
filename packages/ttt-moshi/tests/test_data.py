"""Shard loader: round trip, windows, and clear errors for bad shapes and vocabularies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ttt_moshi import TokenShards, load_shard, save_shard

K, CARD, TEXT_CARD = 3, 32, 40


def _codes(n, t, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.integers(0, CARD, size=(n, K, t))
    c[:, 0] = rng.integers(0, TEXT_CARD, size=(n, t))
    return c


def _shards(paths, seq_len=10, **kw):
    return TokenShards(
        paths, num_codebooks=K, card=CARD, text_card=TEXT_CARD, seq_len=seq_len, **kw
    )


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_round_trip_and_windows(tmp_path, suffix):
    a, b = _codes(2, 25, seed=1), _codes(1, 31, seed=2)[0]  # [N, K, T] and [K, T]
    pa, pb = save_shard(tmp_path / f"a{suffix}", a), save_shard(tmp_path / f"b{suffix}", b)
    assert np.array_equal(load_shard(pa), a)
    assert np.array_equal(load_shard(pb), b[None])
    ds = _shards([pa, pb], seq_len=10)
    assert len(ds) == 2 * 2 + 3  # T // 10 windows per recording, tail dropped
    assert torch.equal(ds[0], torch.from_numpy(a[0, :, :10]))
    assert torch.equal(ds[6], torch.from_numpy(b[:, 20:30]))
    batches = list(ds.batches(3, epochs=1, seed=0))
    assert len(batches) == 2 and batches[0].shape == (3, K, 10)
    seen = torch.cat(list(ds.batches(7, epochs=1)), 0)
    assert sorted(map(tuple, seen.flatten(1).tolist())) == sorted(
        map(tuple, ds.windows.flatten(1).tolist())
    )  # an epoch is a permutation
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    ("k", "value", "match"),
    [
        (0, TEXT_CARD, "text codebook 0 has token 40"),
        (2, CARD, "audio codebook 2 has token 32"),
        (1, -2, "audio codebook 1 has token -2"),
    ],
)
def test_out_of_range_tokens_are_rejected(tmp_path, k, value, match):
    c = _codes(1, 20)
    c[0, k, 13] = value
    p = save_shard(tmp_path / "bad.npz", c)
    with pytest.raises(ValueError, match=match) as e:
        _shards([p])
    assert "step 13" in str(e.value) and "bad.npz" in str(e.value)


def test_zero_token_only_when_allowed(tmp_path):
    c = _codes(1, 20)
    c[0, 1, 3] = -1
    p = save_shard(tmp_path / "z.npz", c)
    assert len(_shards([p])) == 2
    with pytest.raises(ValueError, match="has token -1"):
        _shards([p], allow_zero_token=False)


def test_bad_shapes_and_types(tmp_path):
    p = save_shard(tmp_path / "k2.npz", _codes(1, 20)[:, :2])
    with pytest.raises(ValueError, match="has 2 codebooks"):
        _shards([p])
    np.savez(tmp_path / "rank4.npz", codes=np.zeros((1, 1, K, 20), dtype=np.int64))
    with pytest.raises(ValueError, match=r"must be \[K, T\] or \[N, K, T\]"):
        _shards([tmp_path / "rank4.npz"])
    np.savez(tmp_path / "float.npz", codes=np.zeros((K, 20), dtype=np.float32))
    with pytest.raises(TypeError, match="integer token ids"):
        _shards([tmp_path / "float.npz"])
    np.savez(tmp_path / "nokey.npz", tokens=np.zeros((K, 20), dtype=np.int64))
    with pytest.raises(ValueError, match="no array 'codes'"):
        _shards([tmp_path / "nokey.npz"])
    short = save_shard(tmp_path / "short.npz", _codes(1, 5))
    with pytest.raises(ValueError, match="seq_len=10"):
        _shards([short])
    with pytest.raises(ValueError, match=r"\.npz or \.safetensors"):
        save_shard(tmp_path / "x.bin", _codes(1, 5))
    with pytest.raises(TypeError, match="list of shard files"):
        _shards(str(short))
    with pytest.raises(FileNotFoundError):
        _shards([tmp_path / "missing.npz"])
