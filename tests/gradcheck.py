"""Central finite differences in float64, the judge of every backward pass."""
import numpy as np


def numerical_grad(f, x, eps=1e-6, max_coords=None, rng=None):
    """d f() / d x by central differences, x changed in place and restored.
    With max_coords, only that many random coordinates (others are NaN)."""
    g = np.full(x.shape, np.nan)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    coords = range(flat.size)
    if max_coords is not None and flat.size > max_coords:
        coords = (rng or np.random.default_rng(0)).choice(flat.size, max_coords, replace=False)
    for i in coords:
        old = flat[i]
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * eps)
    return g


def rel_error(analytic, numeric):
    """Norm-wise relative error over the coordinates that were checked."""
    ok = ~np.isnan(numeric)
    a, n = np.asarray(analytic)[ok], numeric[ok]
    return float(np.linalg.norm(a - n) / max(np.linalg.norm(n), np.linalg.norm(a), 1e-12))
