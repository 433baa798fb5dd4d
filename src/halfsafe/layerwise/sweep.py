"""Sweeps: every prompt through every layer, for one or more variants (fp32, a cast, the fix);
the three jobs built on them (observe, verify, confirm) and the observation's resume state."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from ..errors import HalfsafeError
from ..fixing.observe import ActivationRecorder, SiteStat
from ..model.layers import encode
from .skeleton import FINAL, INPUT, LayerwiseModel

_STATE = "observe-state.pt"


# -- sweeps: every prompt through every layer, for one or more variants --------------------------

# A variant maps a unit to the context its runs happen in (other weights, another dtype).


class _Sweep:
    """The prompts' hidden states, carried through the layers for each variant."""

    def __init__(self, lm: LayerwiseModel, batches: list[dict], variants: dict, before_prompt=None):
        self.lm, self.batches, self.variants = lm, batches, variants
        self.before_prompt = before_prompt or (lambda index: None)
        self.calls: dict[str, list] = {}
        self.hidden: dict[str, list[torch.Tensor]] = {}

    def capture(self) -> None:
        with self.lm.materialised(INPUT):
            for name, context in self.variants.items():
                with context(INPUT):
                    captured = []
                    for index, batch in enumerate(self.batches):
                        self.before_prompt(index)
                        captured.append(self.lm.capture(batch))
                self.hidden[name] = [h for h, _ in captured]
                self.calls[name] = [c for _, c in captured]

    def layer(self, index: int) -> None:
        with self.lm.materialised(index):
            for name, context in self.variants.items():
                with context(index):
                    hidden = self.hidden[name]
                    for p in range(len(self.batches)):
                        self.before_prompt(p)
                        hidden[p] = self.lm.run_layer(index, hidden[p], self.calls[name][p][index])

    def tails(self, *, last_only: bool):
        """Yields (prompt index, {variant: logits [B, T, V]}), one prompt at a time."""
        with self.lm.materialised(FINAL):
            for p, batch in enumerate(self.batches):
                self.before_prompt(p)
                logits = {}
                for name, context in self.variants.items():
                    with context(FINAL):
                        logits[name] = self.lm.tail(batch, self.hidden[name][p], last_only=last_only)
                yield p, logits


def _weights_context(lm: LayerwiseModel, make):
    """A variant whose unit weights are `make(name, tensor)` of the materialised fp32 ones."""
    from ..model.precision import use_weights

    def context(unit):
        names = set(lm.unit_names(unit))
        weights = {n: make(n, p.data) for n, p in lm.model.named_parameters() if n in names and p.is_floating_point()}
        return use_weights(lm.model, weights)

    return context


def cast_variant(lm: LayerwiseModel, dtype: torch.dtype):
    return _weights_context(lm, lambda name, tensor: tensor.to(dtype))


def fixed_variant(lm: LayerwiseModel, scales: dict, settings: list, plan, dtype: torch.dtype):
    """The model as `fix` leaves it: weights scaled by `scales` (parameter -> `formats.scale.Scale`)
    as the checkpoint's format stores them (a quantized layer through its rescaled scales), in
    `dtype`, the eps `settings`, the plan's attention kernel."""
    from ..fixing.apply import use_fix

    @contextmanager
    def context(unit):
        weights = lm.weights_format.scaled_weights(lm.model, scales, dtype, only=set(lm.unit_names(unit)))
        with use_fix(lm.model, settings, plan, weights):
            yield

    return context


# -- observation -----------------------------------------------------------------------------


def observe_layerwise(lm: LayerwiseModel, tokenizer, prompts: list[str], *, state_dir: Path | None = None,
                      progress=None) -> list[SiteStat]:
    """The in-memory `observe`, one layer at a time: the same sites with the same values.

    With `state_dir`, the hidden states and statistics are saved after every layer, and a run
    that finds a state from the same prompts continues after its last layer.
    """

    batches = [encode(tokenizer, p, lm.device) for p in prompts]
    digest = _digest(prompts)
    state_path = state_dir / _STATE if state_dir is not None else None
    with ActivationRecorder(lm.model) as recorder:
        sweep = _Sweep(lm, batches, {"fp32": lambda unit: nullcontext()},
                       before_prompt=lambda index: setattr(recorder, "prompt_index", index))
        sweep.capture()
        start = 0
        saved = _load_state(state_path, digest)
        if saved is not None:
            start, sweep.hidden["fp32"] = saved["next_layer"], saved["hidden"]
            recorder.restore(saved["recorder"])
        for layer in range(start, lm.num_layers):
            sweep.layer(layer)
            if state_path is not None:
                _save_state(state_path, {"digest": digest, "next_layer": layer + 1, "hidden": sweep.hidden["fp32"],
                                         "recorder": recorder.state()})
            if progress is not None:
                progress()
        for _ in sweep.tails(last_only=True):
            pass
    return recorder.sites()


# -- verification ----------------------------------------------------------------------------


def verify_layerwise(lm: LayerwiseModel, tokenizer, prompts: list[str], scales: dict, settings: list, plan,
                     dtype: torch.dtype, *, progress=None) -> dict:
    """`fix`'s verification, one layer at a time: the fixed model and bfloat16 against fp32, by the
    same per-position metrics (teacher-forced; greedy decoding needs the whole model)."""
    from ..fixing.verify import position_metrics, summarise

    batches = [encode(tokenizer, p, lm.device) for p in prompts]
    variants = {"fp32": lambda unit: nullcontext(), "fixed": fixed_variant(lm, scales, settings, plan, dtype),
                "bfloat16": cast_variant(lm, torch.bfloat16)}  # the gate's reference, whatever the target
    sweep = _Sweep(lm, batches, variants)
    sweep.capture()
    for layer in range(lm.num_layers):
        sweep.layer(layer)
        if progress is not None:
            progress()
    collected = {name: {"kl": [], "top1": [], "delta_p": [], "finite": [], "nll": [], "delta": [], "logit": []}
                 for name in variants if name != "fp32"}
    for p, logits in sweep.tails(last_only=False):
        reference = logits["fp32"][0].float()
        targets = batches[p]["input_ids"][0, 1:]
        for name in collected:
            for key, value in position_metrics(reference, logits[name][0].float(), targets).items():
                collected[name][key].append(value.cpu())
    return {name: summarise(name, values, None, None, 0) for name, values in collected.items()}


# -- confirmation (diagnose) -----------------------------------------------------------------


def confirm_layerwise(lm: LayerwiseModel, tokenizer, prompts: list[str], dtype: torch.dtype, *, progress=None):
    """Run the prompts with the weights cast to `dtype`, layer by layer: how many prompts went
    non-finite, and the first module (earliest layer, over all prompts) whose output did."""
    from ..diagnosing import Confirmation, FiniteWatch

    batches = [encode(tokenizer, p, lm.device) for p in prompts]
    sweep = _Sweep(lm, batches, {"cast": cast_variant(lm, dtype)})
    bad = torch.zeros(len(batches), dtype=torch.bool)
    with FiniteWatch(lm.model) as watch:
        sweep.capture()
        for layer in range(lm.num_layers):
            sweep.layer(layer)
            if progress is not None:
                progress()
        for p, logits in sweep.tails(last_only=True):
            finite = bool(torch.isfinite(logits["cast"]).all()) and bool(torch.isfinite(sweep.hidden["cast"][p]).all())
            bad[p] = not finite
    return Confirmation(int(bad.sum()), watch.first_nonfinite(), "")


def _digest(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]


def _load_state(path: Path | None, digest: str) -> dict | None:
    """The saved observation state, if it is for `digest`'s prompts. Loaded with
    `weights_only=True`: tensors, numbers, strings and containers only, so a work directory
    someone has tampered with cannot run code; anything else is refused."""
    if path is None or not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise HalfsafeError(
            f"the resume state {path} is not one halfsafe wrote ({reason}); refusing to load it: "
            f"delete {path.parent} to start over"
        ) from None
    return state if isinstance(state, dict) and state.get("digest") == digest else None


def _save_state(path: Path, state: dict) -> None:
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)
