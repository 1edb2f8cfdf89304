"""The one finite-difference gradient checker every gradient test uses.

Fourth-order central differences in float64:

    f'(x) ≈ (−f(x+2h) + 8 f(x+h) − 8 f(x−h) + f(x−2h)) / 12h

Truncation error is O(h⁴) and rounding error O(ε·S/h), S the size of the terms f sums. The plain
two-point stencil (O(h²)) cannot serve both kinds of inputs these tests draw: LayerNorm over a few
features is curved enough to need h ≤ 1e-6, while gradients of 1e-3 drown in rounding noise unless
h ≥ 1e-5. With the four-point stencil, h = 1e-4 puts both errors near 1e-12.

Small gradients (the ssm's A_log and dt_proj.bias at Mamba's initialisation are 1e-10…1e-13) are
judged against their own scale, not against |f|: each parameter gets a step that grows as its
gradient shrinks, and the estimate's own error is measured, not assumed (see check_gradients).
"""
import numpy as np

# How many times its own measured error an estimate may miss by and still count as agreement.
UNCERTAINTY = 10.0


def numerical_grad(f, x, h=1e-4, indices=None, doubled=False):
    """∂f/∂x[i] by central differences for i in `indices` (flat; default all), perturbing x in place
    and restoring it. f() -> float reads x. Returns an array shaped like x (0 where unchecked); with
    doubled=True also the same estimate at step 2h (two more evaluations per entry), whose
    disagreement with the first measures the estimate's own error."""
    if x.dtype != np.float64:
        raise ValueError(f"finite differences need float64 inputs, got {x.dtype}")
    flat = x.reshape(-1)            # a view: writes reach x
    grad, grad_2h = np.zeros(x.size), np.zeros(x.size)
    steps = (4, 2, 1, -1, -2, -4) if doubled else (2, 1, -1, -2)
    for i in range(x.size) if indices is None else indices:
        old = flat[i]
        values = {}
        for step in steps:
            flat[i] = old + step * h
            values[step] = f()
        flat[i] = old
        grad[i] = (-values[2] + 8 * values[1] - 8 * values[-1] + values[-2]) / (12 * h)
        if doubled:
            grad_2h[i] = (-values[4] + 8 * values[2] - 8 * values[-2] + values[-4]) / (24 * h)
    return (grad.reshape(x.shape), grad_2h.reshape(x.shape)) if doubled else grad.reshape(x.shape)


def relative_error(analytic, numeric, uncertainty=0.0, floor=1e-300):
    """max(0, ‖a − n‖ − uncertainty) / max(‖a‖ + ‖n‖, floor): norm-wise, so single entries near
    zero don't blow it up, and blind to disagreements within the numeric estimate's own error
    (`uncertainty`), so a vanishing gradient's rounding noise never reads as a large error.
    """
    excess = max(0.0, float(np.linalg.norm(analytic - numeric)) - uncertainty)
    return excess / max(float(np.linalg.norm(analytic) + np.linalg.norm(numeric)), floor)


def step_for(analytic, f_value, h):
    """A parameter's own step: h while its gradient is ≥ 1e-6·max(1, |f|), growing as the fourth
    root of how much smaller it is (≤ 10⁴·h). A larger step lifts f's change above rounding noise
    (which falls as 1/h); a fourth root keeps the O(h⁴) truncation small, since a gradient that is
    tiny because of a small factor in its chain (Δ at Mamba init) has higher derivatives as small."""
    scale = float(np.abs(analytic).max()) if analytic.size else 0.0
    ratio = 1e-6 * max(1.0, abs(f_value)) / max(scale, 1e-300)
    return h * float(np.clip(ratio ** 0.25, 1.0, 1e4))


def check_gradients(f, inputs, analytic, max_entries=40, seed=0, h=1e-4):
    """Compare analytic gradients with central differences for each named input.

    f() -> float computes the loss from `inputs` (dict name -> float64 array, perturbed in place);
    analytic: dict name -> gradient array. Large inputs are checked on `max_entries` random entries.
    Returns {name: relative error} (see relative_error), each judged on the parameter's own scale:
    its step is step_for(its gradient), and the estimate's own error is measured as the
    disagreement between the estimates at steps h and 2h (rounding, and 16× the truncation), so
    there is no floor tied to |f|: a 10% error counts once the gradient stands UNCERTAINTY·10 times
    above that measured error (a gradient of 1e-17 when the estimate is good to 1e-20).
    """
    rng = np.random.default_rng(seed)
    f_value = f()
    errors = {}
    for name, x in inputs.items():
        indices = None
        if x.size > max_entries:
            indices = rng.choice(x.size, size=max_entries, replace=False)
        a = np.asarray(analytic[name], dtype=np.float64).reshape(x.shape)
        if indices is not None:
            a = a.reshape(-1)[indices]
        step = step_for(a, f_value, h)
        numeric, numeric_2h = numerical_grad(f, x, h=step, indices=indices, doubled=True)
        if indices is not None:
            numeric, numeric_2h = numeric.reshape(-1)[indices], numeric_2h.reshape(-1)[indices]
        # The two estimates can agree by luck (one entry); rounding f itself, ε·|f|/h per entry,
        # is the least error an estimate can have.
        rounding = np.finfo(np.float64).eps * abs(f_value) / step * np.sqrt(a.size)
        measured = max(float(np.linalg.norm(numeric - numeric_2h)), rounding)
        errors[name] = relative_error(a, numeric, UNCERTAINTY * measured)
    return errors
