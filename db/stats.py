"""Uncertainty for the figures the report shows: Wilson intervals and bootstrap over images.

Torch-free; numpy only. The SQL views compute the same Wilson bounds (`db.views.wilson_sql`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """95% Wilson score interval of a proportion successes / n, as fractions; None when n == 0.

    Unlike the normal (Wald) interval it stays inside [0, 1] and is not degenerate at 0 or n
    successes, which matters for flip rates like the paper's 0.0% under random ablation.
    """
    if n <= 0:
        return None
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be within 0..n, got {successes} of {n}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_ratio_ci(
    numerators: Sequence[float] | np.ndarray,
    denominators: Sequence[float] | np.ndarray,
    *,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval over images of a pooled ratio sum(num) / sum(den).

    numerators, denominators: (n_images,) or (n_images, n_points) — one row per image (e.g.
    object positions hit at each layer, and object positions), resampled together so the
    correlation within an image is kept. Returns (low, high), each of shape () or
    (n_points,) as floats/arrays; None with fewer than 2 images. Deterministic for a seed.
    """
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    if num.shape[0] != den.shape[0]:
        raise ValueError("numerators and denominators need one row per image")
    n = num.shape[0]
    if n < 2:
        return None
    rng = np.random.default_rng(seed)
    num_sums = np.empty((resamples, *num.shape[1:]))
    den_sums = np.empty((resamples, *den.shape[1:]))
    # A resample as counts per image (how often each was drawn): its sums are counts @ rows.
    # In blocks of resamples, so memory is block x images, never resamples x images x points.
    block = max(1, min(resamples, 500_000 // n))
    for start in range(0, resamples, block):
        size = min(block, resamples - start)
        picks = rng.integers(0, n, size=(size, n)) + n * np.arange(size)[:, None]
        counts = np.bincount(picks.ravel(), minlength=size * n).reshape(size, n).astype(np.float64)
        num_sums[start : start + size] = counts @ num
        den_sums[start : start + size] = counts @ den
    with np.errstate(invalid="ignore", divide="ignore"):
        ratios = num_sums / den_sums
    alpha = (1 - level) / 2
    low, high = np.nanquantile(ratios, [alpha, 1 - alpha], axis=0)
    return low, high


# The bootstrap every page of the site uses, stated in each chart's caption.
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def wilson_percent(successes: int, n: int) -> tuple[float, float] | None:
    """`wilson_interval` in percent (how the ablation pages print flip rates)."""
    interval = wilson_interval(successes, n)
    return None if interval is None else (100 * interval[0], 100 * interval[1])


def bootstrap_curve_ci(
    numerators: np.ndarray, denominators: np.ndarray
) -> tuple[list[float | None], list[float | None]]:
    """Per-point percentile bootstrap intervals over images of pooled ratios, as lists.

    numerators, denominators: (n_images, n_points); an image without a value at a point has
    0 in both (it adds nothing to that point's sums). With BOOTSTRAP_RESAMPLES and
    BOOTSTRAP_SEED. A point is None where fewer than 2 images have a value there, or where
    the interval is undefined (no resample has a denominator).
    """
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    n_points = num.shape[1] if num.ndim == 2 else 0
    none: list[float | None] = [None] * n_points
    with warnings.catch_warnings():
        # A point no resample has a denominator for is all-NaN: reported as None below.
        warnings.simplefilter("ignore", RuntimeWarning)
        result = bootstrap_ratio_ci(num, den, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED)
    if result is None:
        return list(none), list(none)
    low, high = (np.atleast_1d(np.asarray(bound, dtype=np.float64)) for bound in result)
    contributing = (den > 0).sum(axis=0)
    lows: list[float | None] = []
    highs: list[float | None] = []
    for j in range(n_points):
        ok = contributing[j] >= 2 and np.isfinite(low[j]) and np.isfinite(high[j])
        lows.append(float(low[j]) if ok else None)
        highs.append(float(high[j]) if ok else None)
    return lows, highs
