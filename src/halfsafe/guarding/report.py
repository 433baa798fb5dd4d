"""What a guarded generation reports: events per step and row, a report per call, running counters."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..errors import HalfsafeError
from .degeneration import MAX_LOOP_PERIOD, DegenerationMonitor
from .sanitize import SanitizeLogits

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



def flag_events(sanitizer: SanitizeLogits, monitor: DegenerationMonitor) -> list[GuardEvent]:
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
