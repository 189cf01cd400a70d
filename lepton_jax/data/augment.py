"""Image augmentation as pure, jit-able jax functions with per-example randomness.

Images are ``[B, H, W, C]``; one key drives the whole batch and each example
draws its own transform from it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_images(where: str, images: jax.Array) -> None:
    if jnp.ndim(images) != 4:
        raise ValueError(f"{where}: images must have rank 4 [batch, height, width, channels], got shape {jnp.shape(images)}")


def random_flip(
    key: jax.Array, images_BxHxWxC: jax.Array, *, horizontal: bool = True, vertical: bool = False, prob: float = 0.5
) -> jax.Array:
    """Flips each image left-right (and/or up-down) with probability ``prob``."""
    _check_images("random_flip", images_BxHxWxC)
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"random_flip: prob must be in [0, 1], got {prob}")
    B = images_BxHxWxC.shape[0]
    key_h, key_v = jax.random.split(key)
    out = images_BxHxWxC
    for enabled, k, axis in ((horizontal, key_h, 2), (vertical, key_v, 1)):
        if enabled:
            flip_B = jax.random.bernoulli(k, prob, (B,))
            out = jnp.where(flip_B[:, None, None, None], jnp.flip(out, axis=axis), out)
    return out


def _shift_one(image_HxWxC: jax.Array, dy: jax.Array, dx: jax.Array, fill: float) -> jax.Array:
    """Moves the content by (dy, dx) pixels; uncovered pixels take ``fill``."""
    H, W, _ = image_HxWxC.shape
    rows = jnp.arange(H) - dy
    cols = jnp.arange(W) - dx
    valid = ((rows >= 0) & (rows < H))[:, None] & ((cols >= 0) & (cols < W))[None, :]
    gathered = image_HxWxC[jnp.clip(rows, 0, H - 1)][:, jnp.clip(cols, 0, W - 1)]
    return jnp.where(valid[..., None], gathered, jnp.asarray(fill, image_HxWxC.dtype))


def random_translate(key: jax.Array, images_BxHxWxC: jax.Array, max_shift: int, fill: float = 0.0) -> jax.Array:
    """Shifts each image by integers in ``[-max_shift, max_shift]`` on both axes
    (no wrap-around; uncovered pixels are ``fill``)."""
    _check_images("random_translate", images_BxHxWxC)
    if not isinstance(max_shift, int) or max_shift < 0:
        raise ValueError(f"random_translate: max_shift must be a non-negative int, got {max_shift!r}")
    B = images_BxHxWxC.shape[0]
    shifts_Bx2 = jax.random.randint(key, (B, 2), -max_shift, max_shift + 1)
    return jax.vmap(_shift_one, in_axes=(0, 0, 0, None))(images_BxHxWxC, shifts_Bx2[:, 0], shifts_Bx2[:, 1], fill)


def random_crop(key: jax.Array, images_BxHxWxC: jax.Array, padding: int, fill: float = 0.0) -> jax.Array:
    """Pads each image by ``padding`` with ``fill`` and crops a random H x W window."""
    _check_images("random_crop", images_BxHxWxC)
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"random_crop: padding must be a non-negative int, got {padding!r}")
    B, H, W, C = images_BxHxWxC.shape
    padded = jnp.pad(images_BxHxWxC, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=fill)
    offsets_Bx2 = jax.random.randint(key, (B, 2), 0, 2 * padding + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (H, W, C))

    return jax.vmap(crop)(padded, offsets_Bx2)


def augment_images(
    key: jax.Array,
    images_BxHxWxC: jax.Array,
    *,
    flip: bool = False,
    max_shift: int = 0,
    crop_padding: int = 0,
) -> jax.Array:
    """Applies the enabled augmentations in the order crop, translate, flip."""
    key_crop, key_shift, key_flip = jax.random.split(key, 3)
    out = images_BxHxWxC
    if crop_padding:
        out = random_crop(key_crop, out, crop_padding)
    if max_shift:
        out = random_translate(key_shift, out, max_shift)
    if flip:
        out = random_flip(key_flip, out)
    return out


def mix_inputs(key: jax.Array, inputs_BxD: jax.Array, alpha: float = 1.0) -> jax.Array:
    """Blends each example with another of the batch: ``lam * x[i] + (1 - lam) * x[perm[i]]``.

    ``lam ~ Beta(alpha, alpha)`` per example and ``perm`` is a random
    permutation; ``inputs`` is ``[B, ...]`` of any rank. Labels are not mixed:
    this makes unlabelled inputs for a teacher to label in distillation
    (mixup's images without its label arithmetic). Returns ``[B, ...]`` in the
    inputs' dtype.
    """
    if jnp.ndim(inputs_BxD) < 1 or not jnp.issubdtype(jnp.result_type(inputs_BxD), jnp.floating):
        raise ValueError(f"mix_inputs: inputs must be a floating array [batch, ...], got shape {jnp.shape(inputs_BxD)} "
                         f"dtype {jnp.result_type(inputs_BxD)}")
    if not alpha > 0:
        raise ValueError(f"mix_inputs: alpha must be > 0, got {alpha!r}")
    B = inputs_BxD.shape[0]
    key_lam, key_perm = jax.random.split(key)
    lam_B = jax.random.beta(key_lam, alpha, alpha, (B,)).astype(inputs_BxD.dtype)
    lam = lam_B.reshape((B,) + (1,) * (inputs_BxD.ndim - 1))
    partner = inputs_BxD[jax.random.permutation(key_perm, B)]
    return lam * inputs_BxD + (1 - lam) * partner
