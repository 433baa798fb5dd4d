"""A vLLM V1 logits processor that keeps sampling from emitting garbage on non-finite logits.

What `halfsafe.guarding.SanitizeLogits` does in transformers, in a vLLM batch: NaN -> -inf,
+inf -> float16's maximum (certain, yet no temperature or penalty overflows it; vLLM's sampler
works in float32), and a row with nothing usable left (all NaN or -inf) puts all its mass on
its request's end token, so the request ends instead of emitting token 0 (argmax of NaN) until
max_tokens. Healthy rows are unchanged.

Not argmax-invariant: vLLM skips argmax-invariant processors for greedy requests, and greedy
requests are the ones that print token 0 forever.

Load it with `--logits-processors halfsafe.vllm.processor:SanitizeLogits` or
`LLM(..., logits_processors=[SanitizeLogits])`. The rows it changed are counted on the device
(no host synchronisation per step); a background thread reads the count once the device has
produced it and publishes it as `halfsafe:sanitized_rows` (see halfsafe.vllm.metrics).
"""

from __future__ import annotations

import queue
import threading

import numpy as np
import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from . import metrics

INF_LOGIT = float(torch.finfo(torch.float16).max)


class SanitizeLogits(LogitsProcessor):
    """logits: [B, V] float32 (B = requests in the persistent batch) -> the same tensor, changed
    in place where a row held NaN or +inf or had no usable entry."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        max_reqs = vllm_config.scheduler_config.max_num_seqs
        self.default_end = _model_end_token(vllm_config)
        self.end_host = np.full(max_reqs, self.default_end, dtype=np.int64)  # per batch index
        self.end_staging = torch.from_numpy(self.end_host)
        if is_pin_memory:
            self.end_staging = self.end_staging.pin_memory()
            self.end_host = self.end_staging.numpy()
        self.end = self.end_staging.to(device)  # [max_reqs]
        self.rows = torch.arange(max_reqs, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)  # rows changed, this process
        self.count_host = torch.zeros((), dtype=torch.int64, pin_memory=is_pin_memory)
        self.cuda = torch.device(device).type == "cuda"
        self.publish = _publishes(vllm_config)
        self.pending: queue.SimpleQueue = queue.SimpleQueue()
        if self.publish:
            threading.Thread(target=self._publisher, name="halfsafe-sanitized-rows", daemon=True).start()

    def is_argmax_invariant(self) -> bool:
        return False  # it changes all-NaN rows, whose argmax (token 0) is the failure itself

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if not batch_update:
            return
        changed = False
        for index in batch_update.removed:
            self.end_host[index] = self.default_end
        for index, params, _, _ in batch_update.added:
            self.end_host[index] = _request_end_token(params, self.default_end)
            changed = True
        for a, b, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                self.end_host[[a, b]] = self.end_host[[b, a]]
            else:
                self.end_host[b] = self.end_host[a]
            changed = True
        if changed:
            self.end.copy_(self.end_staging, non_blocking=True)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        rows = logits.shape[0]
        peak = logits.amax(dim=-1)  # [B]: NaN if the row holds a NaN, +inf if a +inf
        broken = torch.isnan(peak) | torch.isposinf(peak)
        torch.nan_to_num_(logits, nan=float("-inf"), posinf=INF_LOGIT, neginf=float("-inf"))
        usable = logits.amax(dim=-1) > float("-inf")  # [B]
        index, end = self.rows[:rows], self.end[:rows]
        logits.masked_fill_(~usable[:, None], float("-inf"))
        logits[index, end] = torch.where(usable, logits[index, end], 0.0)
        self.count += (broken | ~usable).sum()
        if self.publish:
            self.count_host.copy_(self.count, non_blocking=True)
            event = None
            if self.cuda:
                event = torch.cuda.Event()
                event.record()
            self.pending.put(event)
        return logits

    def _publisher(self) -> None:
        """Waits for the device (here, not in the engine's loop) and writes the total when it moved."""
        published = 0
        while True:
            event = self.pending.get()
            while not self.pending.empty():  # only the latest step matters
                event = self.pending.get()
            if event is not None:
                event.synchronize()
            value = int(self.count_host)
            if value != published:
                metrics.record(value)
                published = value


def _request_end_token(params, default: int) -> int:
    """The token that ends this request: its eos, else its lowest stop token, else the model's."""
    eos = getattr(params, "_eos_token_id", None)
    if eos is not None:
        return int(eos)
    stops = getattr(params, "_all_stop_token_ids", None) or getattr(params, "stop_token_ids", None)
    return int(min(stops)) if stops else default


def _model_end_token(vllm_config) -> int:
    config = vllm_config.model_config.hf_config
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return int(eos) if eos is not None else 0


def _publishes(vllm_config) -> bool:
    """Every tensor-parallel rank samples the same rows: only the first publishes, so a row is
    counted once."""
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0
    except Exception:  # noqa: BLE001 - not initialised: a single process samples
        return True
