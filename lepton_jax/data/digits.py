"""scikit-learn's bundled 8x8 handwritten digits: 1,797 real images, no download."""

from __future__ import annotations

import numpy as np

CLASS_NAMES = tuple(str(d) for d in range(10))


def load_digits() -> dict[str, np.ndarray]:
    """Returns ``{"image": float32 [1797, 8, 8, 1] in [0, 1], "label": int32 [1797]}``."""
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    images = (bunch.images.astype(np.float32) / 16.0)[..., None]
    return {"image": images, "label": bunch.target.astype(np.int32)}
