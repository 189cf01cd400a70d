"""Splits, normalization, deterministic resumable batching, augmentation, digits."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lepton_jax import data


def _dataset(n=50):
    return {"x": np.arange(n * 2, dtype=np.float32).reshape(n, 2), "label": (np.arange(n) % 3).astype(np.int32)}


def test_split_is_disjoint_complete_deterministic_and_stratified():
    d = _dataset(90)
    train, val, test = data.split(d, (0.6, 0.2, 0.2), seed=1, stratify_key="label")
    ids = [set(s["x"][:, 0].tolist()) for s in (train, val, test)]
    assert ids[0].isdisjoint(ids[1]) and ids[0].isdisjoint(ids[2]) and ids[1].isdisjoint(ids[2])
    assert sum(map(len, ids)) == 90 and (len(ids[0]), len(ids[1]), len(ids[2])) == (54, 18, 18)
    for s in (train, val, test):
        counts = np.bincount(s["label"], minlength=3)
        assert counts.min() == counts.max()  # 30 per class split 18/6/6
        np.testing.assert_array_equal(s["x"][:, 0] // 2 % 3, s["label"])  # rows stay aligned
    again = data.split(d, (0.6, 0.2, 0.2), seed=1, stratify_key="label")
    np.testing.assert_array_equal(again[0]["x"], train["x"])
    other = data.split(d, (0.6, 0.2, 0.2), seed=2, stratify_key="label")
    assert not np.array_equal(other[0]["x"], train["x"])


def test_normalizer_uses_training_statistics_and_round_trips_json():
    train = np.random.default_rng(0).normal(3.0, 2.0, size=(100, 4, 4, 1))
    norm = data.Normalizer.fit(train)
    np.testing.assert_allclose(norm.mean, train.mean(), rtol=1e-6)
    np.testing.assert_allclose(norm(train).std(), 1.0, rtol=1e-5)
    per_feature = data.Normalizer.fit(train.reshape(100, -1), per_feature=True)
    np.testing.assert_allclose(per_feature.mean, train.reshape(100, -1).mean(0), rtol=1e-5)
    restored = data.Normalizer.from_dict(json.loads(json.dumps(per_feature.to_dict())))
    np.testing.assert_array_equal(restored(train.reshape(100, -1)), per_feature(train.reshape(100, -1)))
    with pytest.raises(ValueError, match=r"x must end with the fitted feature shape \(16,\), got \(3, 4\)"):
        per_feature(np.ones((3, 4)))
    constant = data.Normalizer.fit(np.ones((5, 2)), per_feature=True)
    assert np.all(np.isfinite(constant(np.ones((2, 2)))))


def test_batch_iterator_epochs_are_deterministic_permutations():
    d = _dataset(50)
    it = data.BatchIterator(d, 16, seed=3, drop_remainder=False)
    assert it.steps_per_epoch == 4
    epoch0 = [next(it) for _ in range(4)]
    assert [len(b["x"]) for b in epoch0] == [16, 16, 16, 2]
    seen = np.concatenate([b["x"][:, 0] for b in epoch0])
    assert sorted(seen.tolist()) == sorted(d["x"][:, 0].tolist())  # each example exactly once
    epoch1 = np.concatenate([next(it)["x"][:, 0] for _ in range(4)])
    assert not np.array_equal(seen, epoch1) and it.epoch == 1
    same = data.BatchIterator(d, 16, seed=3, drop_remainder=False)
    np.testing.assert_array_equal(next(same)["x"], epoch0[0]["x"])
    dropped = data.BatchIterator(d, 16, seed=3)
    assert dropped.steps_per_epoch == 3
    unshuffled = data.BatchIterator(d, 16, shuffle=False)
    np.testing.assert_array_equal(next(unshuffled)["x"], d["x"][:16])


def test_batch_iterator_resumes_exactly_mid_epoch():
    d = _dataset(50)
    reference = data.BatchIterator(d, 8, seed=7)
    stream = [next(reference)["x"] for _ in range(20)]  # crosses epoch boundaries
    it = data.BatchIterator(d, 8, seed=7)
    for _ in range(9):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    resumed = data.BatchIterator(d, 8, seed=7)
    resumed.set_state(state)
    for expected in stream[9:]:
        np.testing.assert_array_equal(next(resumed)["x"], expected)
    with pytest.raises(ValueError, match="saved with seed 7, this iterator has 8"):
        data.BatchIterator(d, 8, seed=8).set_state(state)


def test_iterate_once_pads_and_masks():
    d = _dataset(21)
    batches = list(data.iterate_once(d, 8))
    assert [b["x"].shape for b in batches] == [(8, 2)] * 3
    assert [int(b["mask"].sum()) for b in batches] == [8, 8, 5]
    real = np.concatenate([b["x"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(real, d["x"])
    unpadded = list(data.iterate_once(d, 8, pad=False))
    assert unpadded[-1]["x"].shape == (5, 2)


def test_bad_data_raises():
    with pytest.raises(ValueError, match=r"data\['x'\] has 5 examples but data\['y'\] has 4"):
        data.BatchIterator({"x": np.ones(5), "y": np.ones(4)}, 2)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        data.BatchIterator(_dataset(), 0)
    with pytest.raises(ValueError, match="batch_size 64 exceeds the 50 examples"):
        data.BatchIterator(_dataset(), 64)
    with pytest.raises(ValueError, match="fractions must be >= 2 positive numbers summing to 1"):
        data.split(_dataset(), (0.5, 0.6))
    with pytest.raises(ValueError, match="stratify_key 'y' is not in data"):
        data.split(_dataset(), stratify_key="y")
    with pytest.raises(TypeError, match="data must be a non-empty mapping"):
        data.BatchIterator([np.ones(3)], 1)


def test_translate_matches_numpy_shift_and_flip_is_an_involution():
    images = np.random.default_rng(0).normal(size=(16, 6, 5, 2)).astype(np.float32)
    key = jax.random.PRNGKey(3)
    out = np.asarray(jax.jit(lambda k, x: data.random_translate(k, x, max_shift=2))(key, images))
    shifts = np.asarray(jax.random.randint(key, (16, 2), -2, 3))
    for i, (dy, dx) in enumerate(shifts):
        expected = np.zeros_like(images[i])
        src = images[i][max(-dy, 0):6 - max(dy, 0), max(-dx, 0):5 - max(dx, 0)]
        expected[max(dy, 0):max(dy, 0) + src.shape[0], max(dx, 0):max(dx, 0) + src.shape[1]] = src
        np.testing.assert_array_equal(out[i], expected)
    assert len({tuple(s) for s in shifts}) > 1  # per-example randomness

    flipped = data.random_flip(key, images, prob=1.0)
    np.testing.assert_array_equal(flipped, images[:, :, ::-1])
    np.testing.assert_array_equal(data.random_flip(key, flipped, prob=1.0), images)
    half = np.asarray(data.random_flip(key, images))
    assert 0 < sum(np.array_equal(half[i], images[i]) for i in range(16)) < 16


def test_crop_is_a_shifted_window_and_keys_differ():
    images = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4, 1) + 1
    out = np.asarray(data.random_crop(jax.random.PRNGKey(0), images, padding=1))
    assert out.shape == images.shape
    for i in range(2):
        padded = np.pad(images[i], ((1, 1), (1, 1), (0, 0)))
        windows = [padded[a:a + 4, b:b + 4] for a in range(3) for b in range(3)]
        assert any(np.array_equal(out[i], w) for w in windows)
    a = data.augment_images(jax.random.PRNGKey(1), images, flip=True, max_shift=1, crop_padding=1)
    b = data.augment_images(jax.random.PRNGKey(2), images, flip=True, max_shift=1, crop_padding=1)
    assert a.shape == images.shape and not np.array_equal(a, b)
    with pytest.raises(ValueError, match=r"random_crop: images must have rank 4 .* got shape \(4, 4\)"):
        data.random_crop(jax.random.PRNGKey(0), jnp.ones((4, 4)), 1)


def test_mix_inputs_blends_each_example_with_a_partner():
    images = np.random.default_rng(0).normal(size=(12, 3, 3, 1)).astype(np.float32)
    key = jax.random.PRNGKey(5)
    out = np.asarray(jax.jit(lambda k, x: data.mix_inputs(k, x, 0.4))(key, images))
    key_lam, key_perm = jax.random.split(key)
    lam = np.asarray(jax.random.beta(key_lam, 0.4, 0.4, (12,)), np.float32)[:, None, None, None]
    perm = np.asarray(jax.random.permutation(key_perm, 12))
    np.testing.assert_allclose(out, lam * images + (1 - lam) * images[perm], rtol=1e-6, atol=1e-6)
    assert sorted(perm.tolist()) == list(range(12)) and len(np.unique(lam.round(4))) > 1
    with pytest.raises(ValueError, match=r"mix_inputs: inputs must be a floating array .* got shape \(4,\) dtype int32"):
        data.mix_inputs(key, jnp.arange(4), 1.0)
    with pytest.raises(ValueError, match="mix_inputs: alpha must be > 0, got 0"):
        data.mix_inputs(key, images, 0)


def test_digits_is_real_and_well_formed():
    d = data.load_digits()
    assert d["image"].shape == (1797, 8, 8, 1) and d["image"].dtype == np.float32
    assert d["label"].shape == (1797,) and d["label"].dtype == np.int32
    assert d["image"].min() == 0.0 and d["image"].max() == 1.0
    assert sorted(np.unique(d["label"]).tolist()) == list(range(10)) and len(data.CLASS_NAMES) == 10


def test_sharded_iterators_partition_each_global_batch():
    d = _dataset(48)
    whole = data.BatchIterator(d, 12, seed=4)
    shards = [data.BatchIterator(d, 12, seed=4, num_shards=3, shard_index=i) for i in range(3)]
    for _ in range(6):  # crosses an epoch boundary
        expected = next(whole)["x"]
        got = np.concatenate([next(s)["x"] for s in shards])
        np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError, match="batch_size 12 must divide into num_shards=5 shards"):
        data.BatchIterator(d, 12, num_shards=5, shard_index=0)
    with pytest.raises(ValueError, match=r"0 <= shard_index < num_shards, got 2, 2"):
        data.BatchIterator(d, 12, num_shards=2, shard_index=2)
