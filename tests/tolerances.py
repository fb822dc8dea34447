"""Per-dtype tolerances for comparing a backend against the float32 reference (one table).

Forward outputs and gradients are compared with ``torch.testing.assert_close(actual, expected,
atol=..., rtol=...)``. The reference always runs in float32; low-precision backends are compared
after casting their output to float32.
"""

import torch

#: dtype -> {"fwd": (atol, rtol), "bwd": (atol, rtol)}
TOLERANCES = {
    torch.float32: {"fwd": (1e-5, 1e-5), "bwd": (1e-4, 1e-4)},
    torch.float16: {"fwd": (2e-3, 2e-3), "bwd": (1e-2, 1e-2)},
    torch.bfloat16: {"fwd": (2e-2, 2e-2), "bwd": (5e-2, 5e-2)},
}


def tol(dtype: torch.dtype, kind: str = "fwd") -> dict:
    """Keyword arguments for ``torch.testing.assert_close`` at ``dtype`` for ``kind`` (fwd/bwd)."""
    atol, rtol = TOLERANCES[dtype][kind]
    return {"atol": atol, "rtol": rtol}
