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

from __future__ import annotations

import functools
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from .dtypes import dtype_name
from .errors import HalfsafeError
from .hooks import HookSet
from .timing import now

POLICIES = ("recover", "sanitize", "raise")
INF_LOGIT = float(torch.finfo(torch.float16).max)  # what +inf becomes: certain, yet no warper overflows it
DEFAULT_RUN = 16  # same token this many times in a row: degenerate
DEFAULT_FLOOD = 4  # token 0 this many times in a row: the NaN symptom
MAX_LOOP_PERIOD = 8

# Kinds of event, in the order a report lists them.
NONFINITE, RECOVERED, UNRECOVERED, SANITIZED, STOPPED = "nonfinite", "recovered", "unrecovered", "sanitized", "stopped"
REPEAT, LOOP, TOKEN0 = "repeat", "loop", "token0"
_DEGENERATION_CODES = {1: REPEAT, 2: LOOP, 3: TOKEN0}


class NonFiniteLogits(HalfsafeError):
    """A step's logits were non-finite and the policy was `raise`."""

    exit_code = 5


@dataclass
class GuardEvent:
    step: int  # 0 is the prompt's forward, which chooses the first new token
    row: int  # the row of the batch
    kind: str
    module: str | None = None  # the first module whose output went non-finite, where known
    detail: str = ""

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class GuardReport:
    policy: str
    dtype: str
    steps: int = 0
    events: list[GuardEvent] = field(default_factory=list)
    seconds: float = 0.0  # the whole generate call
    overhead_seconds: float = 0.0  # host time in the guard's hook, processor and criteria (on a GPU
    # the one check also waits there for the step's kernels, so this is an upper bound)
    advice: list[str] = field(default_factory=list)

    @property
    def recovered_steps(self) -> list[int]:
        return sorted({e.step for e in self.events if e.kind == RECOVERED})

    @property
    def nonfinite_steps(self) -> list[int]:
        return sorted({e.step for e in self.events if e.kind == NONFINITE})

    def of_kind(self, *kinds: str) -> list[GuardEvent]:
        return [e for e in self.events if e.kind in kinds]

    def to_json(self) -> dict:
        return {
            "policy": self.policy, "dtype": self.dtype, "steps": self.steps,
            "nonfinite_steps": self.nonfinite_steps, "recovered_steps": self.recovered_steps,
            "events": [e.to_json() for e in self.events], "seconds": self.seconds,
            "overhead_seconds": self.overhead_seconds, "advice": self.advice,
        }


@dataclass
class GuardCounters:
    """Running totals over every generation of one guard, for a service to export."""

    generations: int = 0
    steps: int = 0
    nonfinite_rows: int = 0
    recovered_rows: int = 0
    unrecovered_rows: int = 0
    sanitized_rows: int = 0
    stopped_rows: int = 0
    degeneration_events: int = 0
    overhead_seconds: float = 0.0

    def add(self, report: GuardReport) -> None:
        self.generations += 1
        self.steps += report.steps
        self.nonfinite_rows += len(report.of_kind(NONFINITE))
        self.recovered_rows += len(report.of_kind(RECOVERED))
        self.unrecovered_rows += len(report.of_kind(UNRECOVERED))
        self.sanitized_rows += len(report.of_kind(SANITIZED))
        self.stopped_rows += len(report.of_kind(STOPPED))
        self.degeneration_events += len(report.of_kind(REPEAT, LOOP, TOKEN0))
        self.overhead_seconds += report.overhead_seconds

    def as_dict(self) -> dict:
        return asdict(self)


# -- the processor -------------------------------------------------------------------------


def _timed(method):
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

    @_timed
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


# -- the stopping criteria -----------------------------------------------------------------


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

    @_timed
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


# -- the guard -----------------------------------------------------------------------------


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
        from .advising import normalise_generation_kwargs

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
        report.events = call.events + _flag_events(sanitizer, monitor)
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
        module = self._first_nonfinite(call, sequence, mask, rows) if self.locate and sequence is not None else None
        for row in rows:
            call.events.append(GuardEvent(step, row, NONFINITE, module))
        if self.policy == "raise":
            raise NonFiniteLogits(
                f"step {step}: the logits of row {rows[0]} are non-finite in "
                f"{dtype_name(output.logits.dtype)} (first non-finite module: {module or 'unknown'}); the model "
                "overflows this dtype: run 'halfsafe fix MODEL', or recover such steps in float32 with "
                "--on-nonfinite recover (on_nonfinite='recover')"
            )
        return self._recover(call, step, rows, sequence, mask, output, module)

    def _sequence(self, call: _Call, step: int, kwargs) -> torch.LongTensor | None:
        """[B, L]: the whole sequence this forward ends, prompt included. The prompt's forward
        sees all of it; a later one sees its last token only, and the monitor holds the rest."""
        if step == 0 or kwargs.get("input_ids") is None:
            return kwargs.get("input_ids")
        return call.monitor.sequence

    def _rerun(self, call: _Call, sequence, mask, rows, dtype=None, use_cache=False):
        """Run `rows` of the whole sequence again, without a cache, optionally computing in `dtype`."""
        from .observing import last_logits_only
        from .precision import compute_in

        index = torch.tensor(rows, device=sequence.device)
        ids = sequence.index_select(0, index)
        row_mask = mask.index_select(0, index) if mask is not None else torch.ones_like(ids)
        positions = (row_mask.long().cumsum(-1) - 1).masked_fill(row_mask == 0, 0)  # as generate makes them
        call.busy = True
        try:
            with torch.inference_mode(), (compute_in(self.model, dtype) if dtype else nullcontext()):
                return self.model(input_ids=ids, attention_mask=row_mask, position_ids=positions,
                                  use_cache=use_cache, **last_logits_only(self.model))
        finally:
            call.busy = False

    def _first_nonfinite(self, call: _Call, sequence, mask, rows) -> str | None:
        """Re-run the broken rows in the model's dtype, watching every module, to name the culprit."""
        from .diagnosing import FiniteWatch

        if any(e.module for e in call.events):  # once per generation: it costs a forward
            return next(e.module for e in call.events if e.module)
        with FiniteWatch(self.model) as watch:
            self._rerun(call, sequence, mask, rows)
        return watch.first_nonfinite()

    def _recover(self, call: _Call, step: int, rows: list[int], sequence, mask, output, module: str | None):
        if sequence is None:
            call.events.extend(GuardEvent(step, r, UNRECOVERED, module, detail="no input_ids to recompute")
                               for r in rows)
            return None
        try:
            fresh = self._rerun(call, sequence, mask, rows, dtype=torch.float32, use_cache=True)
        except (RuntimeError, TypeError, ValueError) as exc:
            detail = f"fp32 recomputation failed: {str(exc).splitlines()[0][:200]}"
            call.events.extend(GuardEvent(step, r, UNRECOVERED, module, detail=detail) for r in rows)
            return None
        new_logits = fresh.logits[:, -1]  # [R, V], fp32
        ok = torch.isfinite(new_logits).all(dim=-1).tolist()
        logits = output.logits.float() if output.logits.dtype != torch.float32 else output.logits.clone()
        good = [i for i, fine in enumerate(ok) if fine]
        repaired = False
        if good:
            index = torch.tensor([rows[i] for i in good], device=logits.device)
            logits[index, -1] = new_logits[good].to(logits.device)
            repaired = _repair_cache(output.get("cache"), fresh.get("cache"), [rows[i] for i in good], good)
        for i, row in enumerate(rows):
            if ok[i]:
                detail = "recomputed in float32" + ("" if repaired else "; KV cache not repaired")
                call.events.append(GuardEvent(step, row, RECOVERED, module, detail=detail))
            else:
                call.events.append(GuardEvent(step, row, UNRECOVERED, module, detail="non-finite in float32 too"))
        output.logits = logits
        call.sanitizer.verified = all(ok)  # every broken row now holds fp32's finite logits
        return output


def guard(model: nn.Module, **options) -> GuardedGenerator:
    """A `GuardedGenerator` around `model`; see its docstring for `options`."""
    return GuardedGenerator(model, **options)


# -- helpers -------------------------------------------------------------------------------


def _as_list(value) -> list[int]:
    if value is None:
        return []
    if torch.is_tensor(value):
        return [int(v) for v in value.reshape(-1).tolist()]
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _repair_cache(cache, fresh, rows: list[int], fresh_rows: list[int]) -> bool:
    """Copy the fp32 recomputation's keys and values for `rows` into the running cache, in its
    dtype, so the next step reads sound entries. A cache of another layout is left alone."""
    layers, new_layers = getattr(cache, "layers", None), getattr(fresh, "layers", None)
    if not layers or not new_layers or len(layers) != len(new_layers):
        return False
    updates = []
    for layer, new in zip(layers, new_layers, strict=True):
        for name in ("keys", "values"):
            old, value = getattr(layer, name, None), getattr(new, name, None)
            if not torch.is_tensor(old) or not torch.is_tensor(value) or value.shape[-2] < old.shape[-2]:
                return False
            # Sliding-window layers keep only the tail.
            value = value[fresh_rows, ..., value.shape[-2] - old.shape[-2]:, :].to(old.dtype)
            if not bool(torch.isfinite(value).all()):
                return False
            updates.append((old, value))
    index = torch.tensor(rows, device=updates[0][0].device)
    for old, value in updates:
        old.index_copy_(0, index, value.to(old.device))
    return True


def _flag_events(sanitizer: SanitizeLogits, monitor: DegenerationMonitor) -> list[GuardEvent]:
    """The processors' device-side flags as events: one read at the end of generation."""
    events = []
    checked = [(step, f) for step, f in enumerate(sanitizer.flags) if f is not None]
    if checked:
        steps = [step for step, _ in checked]
        broken = torch.stack([b for _, (b, _) in checked]).cpu()  # [S', B]
        empty = torch.stack([e for _, (_, e) in checked]).cpu()
        for index, row in (broken | empty).nonzero().tolist():
            step = steps[index]
            if empty[index, row]:
                events.append(GuardEvent(step, row, STOPPED, detail="no usable logit: row stopped"))
            else:
                events.append(GuardEvent(step, row, SANITIZED, detail="non-finite logits masked"))
    if monitor.codes:
        codes = torch.stack(monitor.codes).cpu()  # [S, B]
        for row in range(codes.shape[1]):
            seen = set()
            for step in codes[:, row].nonzero()[:, 0].tolist():
                kind = _DEGENERATION_CODES[int(codes[step, row])]
                if kind not in seen:
                    seen.add(kind)
                    events.append(GuardEvent(step, row, kind, detail=_degeneration_detail(kind, monitor)))
    return events


def _degeneration_detail(kind: str, monitor: DegenerationMonitor) -> str:
    if kind == TOKEN0:
        return f"token 0 {monitor.flood} times in a row"
    if kind == REPEAT:
        return f"one token {monitor.run} times in a row"
    return f"a loop of at most {MAX_LOOP_PERIOD} tokens over {monitor.run}+ tokens"
