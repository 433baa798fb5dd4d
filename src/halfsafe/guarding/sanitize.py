"""`SanitizeLogits`: the LogitsProcessor under every policy; after it no warper can make
`torch.multinomial` raise, and a row with nothing usable stops instead of emitting token 0."""

from __future__ import annotations

import functools
import time

import torch
from transformers import LogitsProcessor

INF_LOGIT = float(torch.finfo(torch.float16).max)  # what +inf becomes: certain, yet no warper overflows it


def timed(method):
    """Adds the host time of each call to `self.seconds` (the guard reports its own cost). Host
    time on purpose, without `timing.now`'s GPU wait: a wait per step would add the stall it measures."""
    @functools.wraps(method)
    def timed(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started

    return timed


class SanitizeLogits(LogitsProcessor):
    """NaN -> -inf, +inf -> float16's maximum, broken rows renormalised; a row with nothing
    usable (all NaN or -inf) puts all its mass on `stop_token` (and the monitor stops it).
    Healthy rows pass unchanged. Never mutates `scores`.

    scores: [B, V] -> [B, V]. Per call it appends to `self.flags` either None (the guard's check
    had already found this step's logits finite: nothing to do, no work on the device) or two
    [B] flags, kept on the device: the row held NaN or +inf; the row had no usable entry.
    """

    def __init__(self, stop_token: int):
        self.stop_token = stop_token
        self.flags: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        self.verified = False  # set by the guard for one step: its check saw finite logits
        self.seconds = 0.0  # host time spent here

    @timed
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.verified:
            self.verified = False
            self.flags.append(None)
            return scores
        # -inf is a legitimate mask (min_new_tokens, top-k, ...); NaN and +inf are not.
        clean = torch.nan_to_num(scores, nan=float("-inf"), posinf=INF_LOGIT, neginf=float("-inf"))
        broken = (clean != scores).any(dim=-1)  # [B]: NaN != anything, and +inf was replaced
        usable = clean.amax(dim=-1) > float("-inf")  # [B]
        renormalised = torch.where(usable, clean.logsumexp(dim=-1), 0.0)[:, None]
        clean = torch.where(broken[:, None], clean - renormalised, clean)
        stop = torch.full_like(clean, float("-inf"))
        stop[:, self.stop_token] = 0.0
        self.flags.append((broken, ~usable))
        return torch.where(usable[:, None], clean, stop)
