"""Layer-wise: observe, verify and export a model one decoder layer at a time, from disk.

For models larger than memory (a 7B model is 28 GB in fp32), as the field's calibration tools
do it (llm-compressor's sequential pipeline, GPTQ's layer loop): memory is the largest *unit*
in fp32 (one decoder layer, or the parts outside the layers: embedding, final norm, output
embedding) plus the prompts' hidden states between layers; time grows linearly with depth.

How it works, with nothing model-specific:
- the model is a *skeleton*: transformers builds it from its config with parameters on the
  meta device (no memory) and buffers real (rotary frequencies are computed, not stored);
- a unit is *materialised* by reading its tensors from the safetensors files (memory-mapped,
  one tensor at a time) into the skeleton's parameters, and put back on meta afterwards;
- the model's own forward prepares each layer's inputs: with the layers replaced by stand-ins
  that record their arguments and pass the hidden state through, one forward per prompt gives
  every layer's attention mask, rotary embeddings and positions, exactly as the model makes
  them (the *capture* pass). The same stand-ins, returning the last layer's real output, let
  the model's own code finish: final norm, output embedding, logit softcapping (the *tail*);
- between the two, each real layer runs alone on every prompt's hidden state.
The observation hooks are the in-memory ones, so the statistics, the plan and the exported
weights are the same as the in-memory path's (the tests check it bit for bit).

Resumable: the work happens in a directory beside the output (`.NAME.halfsafe-partial`); the
observation saves its state after every layer and the export writes one shard per unit
atomically, so a rerun with the same settings continues where the last one stopped. The
output directory appears only at the end, by a rename.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import pickle
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import HalfsafeError
from .fixing.observe import ActivationRecorder, SiteStat, find_decoder_layers, last_logits_only

# Units besides the layers: everything outside them (what the export writes), and its two
# halves as the passes need them: the input embedding (capture) and the rest (tail). A tied
# output embedding is the input embedding's tensor, so it is in both halves.
OUTER, INPUT, FINAL = "outside the layers", "input embedding", "after the layers"
_STATE = "observe-state.pt"


class _Stop(Exception):
    """Ends a capture pass after the last layer's stand-in."""


# -- the checkpoint on disk ----------------------------------------------------------------


class Checkpoint:
    """A safetensors checkpoint directory, read one tensor at a time.

    Each read opens its file and closes it again: a file kept open stays memory-mapped, and the
    pages a run has read would then count as resident until the end of the run.
    """

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self.directory = directory
        self.files = sorted(directory.glob("*.safetensors"))
        if not self.files:
            raise HalfsafeError(f"'{directory}' has no *.safetensors files; layer-wise mode reads safetensors only")
        self._where = {}
        for path in self.files:
            with safe_open(str(path), framework="pt") as handle:
                self._where.update((name, path) for name in handle.keys())

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def load(self, name: str, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._where[name]), framework="pt") as handle:
            tensor = handle.get_tensor(name)
        return tensor.to(device=device, dtype=dtype)

    def fingerprint(self) -> str:
        """Names, sizes and times of the weight files: what a resumed run must find unchanged."""
        stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in self.files]
        return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


# -- the skeleton and its units --------------------------------------------------------------


@dataclass
class _Slot:
    module: nn.Module
    leaf: str  # the parameter's name in `module`


class LayerwiseModel:
    """A model whose weights stay on disk until a unit is materialised."""

    def __init__(self, path: Path, *, device: str | torch.device = "cpu", trust_remote_code: bool = False,
                 attn_implementation: str | None = None):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from .model.loading import check_checkpoint_dir

        self.path = Path(path)
        check_checkpoint_dir(self.path)
        self.checkpoint = Checkpoint(self.path)
        self.device = torch.device(device)
        try:
            config = AutoConfig.from_pretrained(str(self.path), trust_remote_code=trust_remote_code)
            kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                         trust_remote_code=trust_remote_code, **kwargs)
        except Exception as exc:
            reason = str(exc).splitlines()[0][:200]
            raise HalfsafeError(f"could not build the model of '{self.path}': {reason}") from exc
        model.tie_weights()
        self.model = model.eval()
        for buffer in self.model.buffers():
            buffer.data = buffer.data.to(self.device)
        self.layers_path, self.layers = find_decoder_layers(self.model)
        self._slots: dict[str, list[_Slot]] = {}  # parameter name -> every place its tensor sits (ties)
        by_id: dict[int, list[tuple[str, _Slot]]] = {}
        for module_name, module in self.model.named_modules(remove_duplicate=False):
            for leaf, param in module._parameters.items():
                if param is not None:
                    full = f"{module_name}.{leaf}" if module_name else leaf
                    by_id.setdefault(id(param), []).append((full, _Slot(module, leaf)))
        self._keys = _checkpoint_keys(self.model, self.checkpoint)  # parameter name -> tensor name on disk
        for places in by_id.values():
            names = [n for n, _ in places]
            stored = [n for n in names if n in self._keys]
            if not stored:
                raise HalfsafeError(
                    f"'{self.path}' has no tensor for {names[0]}; it is not a checkpoint of this configuration"
                )
            self._slots[stored[0]] = [slot for _, slot in places]
        prefix = self.layers_path + "."
        self._units: dict[int | str, list[str]] = {OUTER: [], INPUT: [], FINAL: []}
        embedding = self.model.get_input_embeddings()
        for name, slots in self._slots.items():
            index = int(name[len(prefix):].split(".", 1)[0]) if name.startswith(prefix) else OUTER
            self._units.setdefault(index, []).append(name)
            if index == OUTER:
                if any(slot.module is embedding for slot in slots):
                    self._units[INPUT].append(name)
                if any(slot.module is not embedding for slot in slots):
                    self._units[FINAL].append(name)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def unit_names(self, unit: int | str) -> list[str]:
        """The canonical parameter names of a unit: layer `unit`, OUTER, INPUT or FINAL."""
        return self._units.get(unit, [])

    def unit_bytes(self, unit: int | str) -> int:
        return sum(4 * self._slots[n][0].module._parameters[self._slots[n][0].leaf].numel()
                   for n in self.unit_names(unit))

    def largest_unit(self) -> tuple[str, int]:
        """The largest set of weights held at once (in fp32), and its name."""
        sizes = {(u if isinstance(u, str) else f"layer {u}"): self.unit_bytes(u) for u in self._units if u != OUTER}
        name = max(sizes, key=sizes.get)
        return name, sizes[name]

    def tensor_key(self, name: str) -> str:
        """The checkpoint's name for the parameter `name` (a unit name)."""
        return self._keys[name]

    def load(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """One parameter's weights (in `dtype`, or as stored if None), read from disk without
        materialising anything."""
        return self.checkpoint.load(self._keys[name], dtype=dtype, device=self.device)

    @contextmanager
    def materialised(self, unit: int | str):
        """The unit's parameters hold their fp32 weights (on the device) inside the block."""
        names = self.unit_names(unit)
        try:
            for name in names:
                param = nn.Parameter(self.load(name), requires_grad=False)
                for slot in self._slots[name]:
                    slot.module._parameters[slot.leaf] = param
            yield
        finally:
            for name in names:
                slots = self._slots[name]
                current = slots[0].module._parameters[slots[0].leaf]
                meta = nn.Parameter(torch.empty(current.shape, dtype=current.dtype, device="meta"), requires_grad=False)
                for slot in slots:
                    slot.module._parameters[slot.leaf] = meta
            release_memory(self.device)

    # -- running -------------------------------------------------------------------------------
    @contextmanager
    def _stand_ins(self, behaviour):
        """Replace every decoder layer by a stand-in calling `behaviour(index, args, kwargs)`."""
        originals = list(self.layers)
        try:
            for index, layer in enumerate(originals):
                self.layers[index] = _StandIn(index, layer, behaviour)
            yield
        finally:
            for index, layer in enumerate(originals):
                self.layers[index] = layer

    def capture(self, batch: dict) -> tuple[torch.Tensor, list[tuple[tuple, dict]]]:
        """One prompt's hidden state entering layer 0 and every layer's other arguments, as the
        model's own forward makes them. Needs the INPUT unit materialised."""
        calls: list[tuple[tuple, dict]] = []
        first: list[torch.Tensor] = []

        def record(index, args, kwargs):
            hidden, rest, kwargs = _split_hidden(args, kwargs)
            if index == 0:
                first.append(hidden)
            calls.append((rest, kwargs))
            if index == self.num_layers - 1:
                raise _Stop
            return hidden

        with self._stand_ins(record), torch.inference_mode():
            try:
                self.model(**batch, use_cache=False, **last_logits_only(self.model))
            except _Stop:
                pass
            except NotImplementedError as exc:  # a weight other than the input embedding, still on meta
                if "meta" not in str(exc):
                    raise
                raise HalfsafeError(
                    f"layer-wise mode cannot run {type(self.model).__name__}: its forward reads weights besides the "
                    "input embedding before the first layer (a position table, say); drop --layerwise"
                ) from exc
        return first[0], calls

    def run_layer(self, index: int, hidden: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
        rest, kwargs = call
        with torch.inference_mode():
            output = self.layers[index](hidden, *rest, **kwargs)
        return output[0] if isinstance(output, (tuple, list)) else output

    def tail(self, batch: dict, final: torch.Tensor, *, last_only: bool) -> torch.Tensor:
        """Logits from the last layer's output `final`, by the model's own code after the layers.
        Needs the FINAL unit materialised: the embedding's output is never read (the last stand-in
        returns `final`), so zeros of its shape and dtype stand in for it."""
        def finish(index, args, kwargs):
            hidden, _, _ = _split_hidden(args, kwargs)
            return final if index == self.num_layers - 1 else hidden

        extra = last_logits_only(self.model) if last_only else {}
        inputs = {k: v for k, v in batch.items() if k != "input_ids"}
        with self._stand_ins(finish), torch.inference_mode():
            return self.model(inputs_embeds=torch.zeros_like(final), **inputs, use_cache=False, **extra).logits


def release_memory(device: torch.device) -> None:
    """Hand freed weights back to the system. A unit's tensors are freed, but glibc serves
    tensors below its (self-raising) mmap threshold from heaps that the next unit's activations
    fragment, so the process kept growing by about a layer a layer (measured: 1.9 GB peak over
    6 Qwen3-1.7B-shaped layers, 1.15 GB with this). `malloc_trim` returns the free pages."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to trim
        return None


def _checkpoint_keys(model: nn.Module, checkpoint: Checkpoint) -> dict[str, str]:
    """Parameter name -> the checkpoint's tensor name, through transformers' own renaming rules
    (e.g. Gemma 3's `language_model.model.*` on disk is `model.language_model.*` in memory).
    A tensor that transformers would convert (fuse per-expert weights into one stacked tensor)
    cannot be read one tensor at a time: refused."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()
    keys = {}
    for key in checkpoint.keys():
        name, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if converted is not None:
            raise HalfsafeError(
                f"'{checkpoint.directory}' stores {key} in a layout transformers converts when loading "
                f"({type(model).__name__} fuses such tensors); layer-wise mode reads one tensor at a time and "
                "cannot do that; use the in-memory path"
            )
        keys[name] = key
    return keys


class _StandIn(nn.Module):
    """Sits where a decoder layer sits; the model still reads the layer's attributes through it."""

    def __init__(self, index: int, layer: nn.Module, behaviour):
        super().__init__()
        object.__setattr__(self, "_layer", layer)  # not a submodule: no hooks, no parameters
        self.index = index
        self.behaviour = behaviour

    def forward(self, *args, **kwargs):
        return self.behaviour(self.index, args, kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    if args:
        return args[0], args[1:], kwargs
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


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
    from .model.precision import use_weights

    def context(unit):
        names = set(lm.unit_names(unit))
        weights = {n: make(n, p.data) for n, p in lm.model.named_parameters() if n in names and p.is_floating_point()}
        return use_weights(lm.model, weights)

    return context


def cast_variant(lm: LayerwiseModel, dtype: torch.dtype):
    return _weights_context(lm, lambda name, tensor: tensor.to(dtype))


def fixed_variant(lm: LayerwiseModel, scales: dict, settings: list, plan, dtype: torch.dtype):
    """The model as `fix` leaves it: weights scaled by `scales` (parameter -> `applying._Scale`)
    in `dtype`, the eps `settings`, the plan's attention kernel."""
    from .fixing.apply import scaled_tensor, use_fix

    @contextmanager
    def context(unit):
        names = set(lm.unit_names(unit))
        weights = {n: scaled_tensor(n, p.data, scales.get(n), dtype)
                   for n, p in lm.model.named_parameters() if n in names and p.is_floating_point()}
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
    from .fixing.observe import encode

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
    from .fixing.observe import encode
    from .fixing.verify import position_metrics, summarise

    batches = [encode(tokenizer, p, lm.device) for p in prompts]
    variants = {"fp32": lambda unit: nullcontext(), "fixed": fixed_variant(lm, scales, settings, plan, dtype),
                "bfloat16": cast_variant(lm, torch.bfloat16)}  # the gate's reference, whatever the target
    sweep = _Sweep(lm, batches, variants)
    sweep.capture()
    for layer in range(lm.num_layers):
        sweep.layer(layer)
        if progress is not None:
            progress()
    collected = {name: {"kl": [], "top1": [], "delta_p": [], "finite": [], "nll": []}
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
    from .diagnosing import Confirmation, FiniteWatch
    from .fixing.observe import encode

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
