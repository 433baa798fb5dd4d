"""Residual-stream roles derived from the model itself, and the gate that proves them exact.

`derive_roles(model)` traces an fp32 forward pass (twice: see deriving.py) and returns a `Roles` value: the parameters
to multiply by s (writers) or 1/s (linear readers, compensations), the eps attributes and
config fields to multiply by s^2, the interior (producer, consumer) pairs, or refusals naming
what cannot be rescaled exactly. `exactness_gate` applies them in fp32 and compares logits.
"""

from .deriving import derive_roles
from .gate import (
    EXACT_BOUND,
    GateResult,
    apply_roles,
    applying_scales,
    eps_settings,
    exactness_gate,
    output_exponents,
    scaled_parameters,
    use_roles,
)
from .probing import probe_invariance
from .roles import Roles

__all__ = [
    "EXACT_BOUND", "GateResult", "Roles", "apply_roles", "derive_roles", "eps_settings", "exactness_gate",
    "applying_scales", "output_exponents",
    "probe_invariance", "scaled_parameters", "use_roles",
]
