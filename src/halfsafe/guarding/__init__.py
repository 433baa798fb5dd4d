"""Guarded generation: never crash, never emit garbage; recover non-finite steps and report them.

`guard(model)` wraps transformers' own `generate`, so every `generate(**kwargs)` call keeps
working, and adds three pieces, each on one of transformers' contracts:

- a forward hook on the model (the only place that sees a step's logits *and* its KV cache
  before any processor runs) that makes one small check per step: are the last position's
  logits finite? On a non-finite row, by policy:
  - `recover`: the row's whole sequence is recomputed in fp32 (`precision.compute_in`: one
    module's weights upcast at a time), its logits replace the broken ones, and its KV cache
    entries are replaced by the fp32 ones (cast back), so the next steps run in the model's
    own dtype again. The chosen token is the one fp32 would choose. Other rows are untouched.
  - `raise`: `NonFiniteLogits`, naming the step, the first non-finite module and the fix.
  - `sanitize`: nothing here; the processor below does it.
- `SanitizeLogits`, a LogitsProcessor (the safety net under every policy): NaN -> -inf,
  +inf -> float16's maximum, the row renormalised; a row with no usable entry is an event and
  a stop for that row (its stop token gets all the mass), never token 0. After it, no warper
  can make `torch.multinomial` raise.
- `DegenerationMonitor`, a StoppingCriteria: runs of one token, token-0 floods and short loops,
  seen even when the logits are finite; reported as events, and a stop when asked.

Processors and criteria keep their flags on the device and the report reads them once, at the
end. The per-step cost is the one check (a sum over the last logits and one host sync; none
under `sanitize`); a step it found finite skips the sanitizer's work.
"""

from .degeneration import DEFAULT_FLOOD, DEFAULT_RUN, MAX_LOOP_PERIOD, DegenerationMonitor
from .generator import POLICIES, GuardedGenerator, guard
from .report import (
    LOOP,
    NONFINITE,
    RECOVERED,
    REPEAT,
    SANITIZED,
    STOPPED,
    TOKEN0,
    UNRECOVERED,
    GuardCounters,
    GuardEvent,
    GuardReport,
    NonFiniteLogits,
)
from .sanitize import INF_LOGIT, SanitizeLogits

__all__ = [
    "DEFAULT_FLOOD", "DEFAULT_RUN", "INF_LOGIT", "LOOP", "MAX_LOOP_PERIOD", "NONFINITE", "POLICIES", "RECOVERED",
    "REPEAT", "SANITIZED", "STOPPED", "TOKEN0", "UNRECOVERED", "DegenerationMonitor", "GuardCounters", "GuardEvent",
    "GuardReport", "GuardedGenerator", "NonFiniteLogits", "SanitizeLogits", "guard",
]
