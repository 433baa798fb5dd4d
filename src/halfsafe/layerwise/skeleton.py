"""The model as a skeleton: parameters on the meta device, units materialised from disk one at a
time, the model's own forward run with its layers replaced by stand-ins (capture, tail)."""

from __future__ import annotations

import ctypes
import functools
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import HalfsafeError
from ..model.layers import find_decoder_layers, last_logits_only
from .checkpoint import Checkpoint, Layout

# Units besides the layers: everything outside them (what the export writes), and its two
# halves as the passes need them: the input embedding (capture) and the rest (tail). A tied
# output embedding is the input embedding's tensor, so it is in both halves.
OUTER, INPUT, FINAL = "outside the layers", "input embedding", "after the layers"


class _Stop(Exception):
    """Ends a capture pass after the last layer's stand-in."""


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

        from ..formats import checkpoint_format
        from ..formats.packed import without_quantization
        from ..model.checks import check_checkpoint_dir

        self.path = Path(path)
        check_checkpoint_dir(self.path)
        self.checkpoint = Checkpoint(self.path)
        # How the checkpoint stores its weights: what reads a quantized weight and writes the fix.
        self.weights_format = checkpoint_format(self.path)
        self.device = torch.device(device)
        try:
            # A plain fp32 skeleton: quantized weights are dequantized by the format as they are read.
            config = without_quantization(AutoConfig.from_pretrained(str(self.path),
                                                                     trust_remote_code=trust_remote_code))
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
        self.layout = Layout(self.model, self.checkpoint, self.weights_format)
        for places in by_id.values():
            names = [n for n, _ in places]
            stored = [n for n in names if n in self.layout]
            if not stored:
                raise HalfsafeError(
                    f"'{self.path}' has no tensor for {names[0]}; it is not a checkpoint of this configuration"
                )
            self._slots[stored[0]] = [slot for _, slot in places]
        self._units: dict[int | str, list[str]] = {OUTER: [], INPUT: [], FINAL: []}
        embedding = self.model.get_input_embeddings()
        for name, slots in self._slots.items():
            index = self._unit_of(name)
            self._units.setdefault(index, []).append(name)
            if index == OUTER:
                if any(slot.module is embedding for slot in slots):
                    self._units[INPUT].append(name)
                if any(slot.module is not embedding for slot in slots):
                    self._units[FINAL].append(name)
        self.layout.check_units(self._unit_of)

    def _unit_of(self, name: str) -> int | str:
        """The layer a parameter belongs to, or OUTER."""
        prefix = self.layers_path + "."
        return int(name[len(prefix):].split(".", 1)[0]) if name.startswith(prefix) else OUTER

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

    def load(self, names: list[str], dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
        """Parameters' weights (in `dtype`, or as stored if None), read from disk (and converted as
        transformers loads them) without materialising anything."""
        return self.layout.read(names, dtype=dtype, device=self.device)

    @contextmanager
    def materialised(self, unit: int | str):
        """The unit's parameters hold their fp32 weights (on the device) inside the block."""
        names = self.unit_names(unit)
        try:
            for name, tensor in self.load(names).items():
                param = nn.Parameter(tensor, requires_grad=False)
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
