"""`GuardedGenerator`: transformers' own `generate` with a per-step check (a forward hook),
`SanitizeLogits` and `DegenerationMonitor` added; state per call, so one guard serves many threads."""

from __future__ import annotations

import functools
import threading
import time
from contextlib import contextmanager

import torch
from torch import nn
from transformers import LogitsProcessorList, StoppingCriteriaList

from ..dtypes import dtype_name
from ..errors import HalfsafeError
from ..model.hooks import HookSet
from ..timing import now
from .degeneration import DEFAULT_FLOOD, DEFAULT_RUN, DegenerationMonitor
from .recovery import first_nonfinite, recover
from .report import NONFINITE, GuardCounters, GuardEvent, GuardReport, NonFiniteLogits, flag_events
from .sanitize import SanitizeLogits

POLICIES = ("recover", "sanitize", "raise")


class _Call:
    """One `generate` call's state, made by the call and handed to its hooks: two calls through
    one guard, in two threads, never see each other's steps or events."""

    def __init__(self, sanitizer: SanitizeLogits, monitor: DegenerationMonitor):
        self.thread = threading.get_ident()  # the forwards this call runs are made in this thread
        self.sanitizer, self.monitor = sanitizer, monitor
        self.step = 0
        self.events: list[GuardEvent] = []
        self.overhead = 0.0
        self.busy = False  # inside the guard's own forwards (re-runs)
        self.sharing = False  # holds the gate's shared side for the forward in flight

    def owns(self, forward_thread: int) -> bool:
        return forward_thread == self.thread and not self.busy


class _Gate:
    """Concurrent calls' forwards share the model; an fp32 recovery, which swaps weights module by
    module (`compute_in`), waits for the forwards in flight and runs alone. Writers go first."""

    def __init__(self):
        self._condition = threading.Condition()
        self._sharing = 0
        self._writing = False
        self._waiting = 0

    def enter_shared(self) -> None:
        with self._condition:
            self._condition.wait_for(lambda: not self._writing and not self._waiting)
            self._sharing += 1

    def leave_shared(self) -> None:
        with self._condition:
            self._sharing -= 1
            self._condition.notify_all()

    @contextmanager
    def alone(self):
        with self._condition:
            self._waiting += 1
            self._condition.wait_for(lambda: not self._writing and not self._sharing)
            self._waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._condition:
                self._writing = False
                self._condition.notify_all()


class GuardedGenerator:
    """`generate` that never crashes on non-finite logits and never emits their garbage.

    >>> guarded = halfsafe.guard(model, on_nonfinite="recover")
    >>> out = guarded.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=32)
    >>> guarded.report.recovered_steps, guarded.counters.as_dict()

    Any `generate` keyword works as it does on the model; a caller's own `logits_processor`
    and `stopping_criteria` lists are kept, the guard's appended. One guard may serve several
    threads at once: each call keeps its state to itself, `report` is the calling thread's last
    report, and `generate_with_report` returns the report with the output.
    """

    def __init__(self, model: nn.Module, *, on_nonfinite: str = "recover", stop_on_degeneration: bool = False,
                 run: int = DEFAULT_RUN, flood: int = DEFAULT_FLOOD, locate: bool = True):
        if on_nonfinite not in POLICIES:
            raise HalfsafeError(f"on_nonfinite '{on_nonfinite}' is not a policy; use one of {', '.join(POLICIES)}")
        self.model = model
        self.policy = on_nonfinite
        self.stop_on_degeneration = stop_on_degeneration
        self.run, self.flood = run, flood
        self.locate = locate
        self.counters = GuardCounters()
        self._counters_lock = threading.Lock()
        self._gate = _Gate()
        self._reports = threading.local()
        self._latest: GuardReport | None = None

    @property
    def report(self) -> GuardReport | None:
        """The calling thread's last report; from a thread that has generated nothing here, the
        last report any thread finished."""
        return getattr(self._reports, "last", None) or self._latest

    def generate(self, inputs: torch.Tensor | None = None, **kwargs):
        return self.generate_with_report(inputs, **kwargs)[0]

    def generate_with_report(self, inputs: torch.Tensor | None = None, **kwargs) -> tuple[object, GuardReport]:
        """`generate`, returning `(output, report)`."""
        from ..advising import normalise_generation_kwargs

        kwargs, advice = normalise_generation_kwargs(kwargs)
        config = self.model.generation_config
        eos = _as_list(kwargs.get("eos_token_id", config.eos_token_id))
        pad = kwargs.get("pad_token_id", config.pad_token_id)
        stop_token = eos[0] if eos else (pad if pad is not None else 0)
        sanitizer = SanitizeLogits(stop_token)
        monitor = DegenerationMonitor(eos, run=self.run, flood=self.flood, stop=self.stop_on_degeneration,
                                      sanitizer=sanitizer)
        processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        processors.append(sanitizer)
        criteria = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
        criteria.append(monitor)

        call = _Call(sanitizer, monitor)
        started = now()
        with HookSet() as hooks:
            # A forward interrupted by a BaseException (Ctrl-C) skips even always_call hooks.
            hooks.callback(functools.partial(self._leave_gate, call))
            hooks.pre_forward(self.model, functools.partial(self._before_forward, call))
            # always_call: the gate is left even when the forward raises.
            hooks.forward(self.model, functools.partial(self._after_forward, call), with_kwargs=True,
                          always_call=True)
            output = self.model.generate(inputs, logits_processor=processors, stopping_criteria=criteria, **kwargs)
        report = GuardReport(self.policy, dtype_name(next(self.model.parameters()).dtype), steps=call.step,
                             seconds=now() - started, advice=advice)
        report.events = call.events + flag_events(sanitizer, monitor)
        report.events.sort(key=lambda e: (e.step, e.row))
        report.overhead_seconds = call.overhead + sanitizer.seconds + monitor.seconds
        self._reports.last = self._latest = report
        with self._counters_lock:
            self.counters.add(report)
        return output, report

    # -- the per-step check -----------------------------------------------------------------
    def _before_forward(self, call: _Call, model, args):
        if call.owns(threading.get_ident()):
            self._gate.enter_shared()
            call.sharing = True

    def _leave_gate(self, call: _Call) -> None:
        if call.sharing:
            call.sharing = False
            self._gate.leave_shared()

    def _after_forward(self, call: _Call, model, args, kwargs, output):
        if not call.owns(threading.get_ident()):
            return None  # another thread's forward, or the guard's own re-run
        self._leave_gate(call)
        if output is None:  # the forward raised; its error propagates
            return None
        started = time.perf_counter()
        step, call.step = call.step, call.step + 1
        try:
            logits = output.logits  # [B, T, V]
            if self.policy == "sanitize":
                return None
            # One reduction: a sum is non-finite iff the row holds NaN or inf (|logit| < 1e30).
            broken = ~torch.isfinite(logits[:, -1].sum(dim=-1, dtype=torch.float32))  # [B]
            if not bool(broken.any()):  # the one host synchronisation per step
                call.sanitizer.verified = True
                return None
            with self._gate.alone():  # the re-runs below swap weights; no other forward may run
                return self._handle_nonfinite(call, step, broken, kwargs, output)
        finally:
            call.overhead += time.perf_counter() - started

    def _handle_nonfinite(self, call: _Call, step: int, broken: torch.Tensor, kwargs, output):
        rows = broken.nonzero()[:, 0].tolist()
        sequence = self._sequence(call, step, kwargs)
        mask = kwargs.get("attention_mask")
        locate = self.locate and sequence is not None
        module = first_nonfinite(self.model, call, sequence, mask, rows) if locate else None
        for row in rows:
            call.events.append(GuardEvent(step, row, NONFINITE, module))
        if self.policy == "raise":
            raise NonFiniteLogits(
                f"step {step}: the logits of row {rows[0]} are non-finite in "
                f"{dtype_name(output.logits.dtype)} (first non-finite module: {module or 'unknown'}); the model "
                "overflows this dtype: run 'halfsafe fix MODEL', or recover such steps in float32 with "
                "--on-nonfinite recover (on_nonfinite='recover')"
            )
        return recover(self.model, call, step, rows, sequence, mask, output, module)

    def _sequence(self, call: _Call, step: int, kwargs) -> torch.LongTensor | None:
        """[B, L]: the whole sequence this forward ends, prompt included. The prompt's forward
        sees all of it; a later one sees its last token only, and the monitor holds the rest."""
        if step == 0 or kwargs.get("input_ids") is None:
            return kwargs.get("input_ids")
        return call.monitor.sequence


def guard(model: nn.Module, **options) -> GuardedGenerator:
    """A `GuardedGenerator` around `model`; see its docstring for `options`."""
    return GuardedGenerator(model, **options)


def _as_list(value) -> list[int]:
    if value is None:
        return []
    if torch.is_tensor(value):
        return [int(v) for v in value.reshape(-1).tolist()]
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
