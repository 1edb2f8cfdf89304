"""The one finite-difference gradient checker every gradient test uses.

Fourth-order central differences in float64:

    f'(x) ≈ (−f(x+2h) + 8 f(x+h) − 8 f(x−h) + f(x−2h)) / 12h

Truncation error is O(h⁴) and rounding error O(ε·|f|/h). The plain two-point stencil (O(h²))
cannot serve both kinds of inputs these tests draw: LayerNorm over a few features is curved
enough to need h ≤ 1e-6, while gradients of 1e-3 drown in rounding noise unless h ≥ 1e-5.
With the four-point stencil, h = 1e-4 puts both errors near 1e-12.
"""
import numpy as np


def numerical_grad(f, x, h=1e-4, indices=None):
    """∂f/∂x[i] by central differences for i in `indices` (flat; default all), perturbing x in place
    and restoring it. f() -> float reads x. Returns an array shaped like x (0 where unchecked)."""
    if x.dtype != np.float64:
        raise ValueError(f"finite differences need float64 inputs, got {x.dtype}")
    flat = x.reshape(-1)            # a view: writes reach x
    grad = np.zeros(x.size)
    for i in range(x.size) if indices is None else indices:
        old = flat[i]
        values = []
        for step in (2, 1, -1, -2):
            flat[i] = old + step * h
            values.append(f())
        flat[i] = old
        grad[i] = (-values[0] + 8 * values[1] - 8 * values[2] + values[3]) / (12 * h)
    return grad.reshape(x.shape)


def relative_error(analytic, numeric, floor=1e-12):
    """‖a − n‖ / max(‖a‖ + ‖n‖, floor): norm-wise, so single entries near zero don't blow it up.

    `floor` stops a vanishing gradient (a saturated softmax, a deep layer at init) from turning
    pure rounding noise into a large "relative" error: below it the comparison is absolute.
    """
    return float(np.linalg.norm(analytic - numeric) / max(np.linalg.norm(analytic) + np.linalg.norm(numeric), floor))


def check_gradients(f, inputs, analytic, max_entries=40, seed=0, h=1e-4):
    """Compare analytic gradients with central differences for each named input.

    f() -> float computes the loss from `inputs` (dict name -> float64 array, perturbed in place);
    analytic: dict name -> gradient array. Large inputs are checked on `max_entries` random entries.
    Returns {name: relative error} (see relative_error; the floor is 1e-3·max(1, |f|)).
    """
    rng = np.random.default_rng(seed)
    # Rounding noise per entry is about ε·|f|/h ≈ 1e-12·|f|; a gradient whose norm is under
    # 1e-3·|f| (a saturated softmax) is therefore judged absolutely instead of relatively.
    floor = 1e-3 * max(1.0, abs(f()))
    errors = {}
    for name, x in inputs.items():
        indices = None
        if x.size > max_entries:
            indices = rng.choice(x.size, size=max_entries, replace=False)
        numeric = numerical_grad(f, x, h=h, indices=indices)
        a = np.asarray(analytic[name], dtype=np.float64).reshape(x.shape)
        if indices is not None:
            a, numeric = a.reshape(-1)[indices], numeric.reshape(-1)[indices]
        errors[name] = relative_error(a, numeric, floor)
    return errors
