"""`DegenerationMonitor`: a StoppingCriteria that sees runs, token-0 floods and short loops,
even when the logits are finite."""

from __future__ import annotations

import torch
from transformers import StoppingCriteria

from ..errors import HalfsafeError
from .sanitize import SanitizeLogits, timed

DEFAULT_RUN = 16  # same token this many times in a row: degenerate
DEFAULT_FLOOD = 4  # token 0 this many times in a row: the NaN symptom
MAX_LOOP_PERIOD = 8


class DegenerationMonitor(StoppingCriteria):
    """Flags degenerate continuations even when the logits are finite:
    - `token0`: the last `flood` new tokens are all id 0 (an all-NaN row's argmax);
    - `repeat`: the last `run` new tokens are one token;
    - `loop`: the last max(`run`, 3p) new tokens repeat with a period p of 2..8.
    Rows that ended (an end-of-sequence token) are not judged. With `stop`, a flagged row is
    finished; a row the sanitizer found with no usable logit is finished too.

    Returns [B] bools without a host synchronisation; flags stay on the device in `self.codes`.
    """

    def __init__(self, eos_ids: list[int], *, run: int = DEFAULT_RUN, flood: int = DEFAULT_FLOOD,
                 stop: bool = False, sanitizer: SanitizeLogits | None = None):
        if run < 2:
            raise HalfsafeError(f"degeneration run {run} must be at least 2 tokens")
        self.eos_ids = eos_ids
        self._eos: torch.Tensor | None = None  # on the device, made once
        self.run, self.flood, self.stop = run, flood, stop
        self.sanitizer = sanitizer
        self.prompt_length: int | None = None
        self.finished: torch.Tensor | None = None
        self.codes: list[torch.Tensor] = []  # per step: [B] int8, 0 = fine
        self.sequence: torch.LongTensor | None = None  # the latest full sequence
        self.seconds = 0.0  # host time spent here

    @timed
    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.sequence = input_ids
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1] - 1
            self.finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            self._eos = torch.tensor(self.eos_ids, dtype=input_ids.dtype, device=input_ids.device)
        new = input_ids[:, self.prompt_length:]  # [B, n]
        n = new.shape[1]
        code = torch.zeros(input_ids.shape[0], dtype=torch.int8, device=input_ids.device)
        for period in range(MAX_LOOP_PERIOD, 0, -1):  # the shortest period wins
            window = self.run if period == 1 else max(self.run, 3 * period)
            if n >= window:
                periodic = (new[:, n - window + period:] == new[:, n - window:n - period]).all(dim=-1)
                code = torch.where(periodic, 1 if period == 1 else 2, code).to(torch.int8)
        if n >= self.flood:
            code = torch.where((new[:, -self.flood:] == 0).all(dim=-1), 3, code).to(torch.int8)
        code = torch.where(self.finished, 0, code).to(torch.int8)
        self.codes.append(code)
        done = (code > 0) if self.stop else torch.zeros_like(self.finished)
        if self.sanitizer is not None and self.sanitizer.flags and self.sanitizer.flags[-1] is not None:
            done = done | (self.sanitizer.flags[-1][1] & ~self.finished)
        if self.eos_ids:
            self.finished = self.finished | torch.isin(new[:, -1], self._eos)
        return done | self.finished
