"""bitsandbytes 4-bit (nf4, fp4): the checkpoints transformers writes for a `load_in_4bit` model.

A quantized Linear stores, under its parameter's own name:
- `weight`: uint8, two 4-bit codes a byte ([out * in / 2, 1]);
- `weight.absmax`: one float32 per block of `blocksize` weights (64 by default), or, with double
  quantization (`bnb_4bit_use_double_quant`), one uint8 per block, itself a blockwise 8-bit code
  whose float32 scales are `weight.nested_absmax` (one per 256 blocks) plus an offset;
- `weight.quant_map` (the 16 code values), `weight.nested_quant_map` (the 256 8-bit ones), and
  `weight.quant_state.bitsandbytes__nf4`: a JSON dict in uint8 (quant type, blocksize, shape, the
  dtype the weight dequantizes to, and with double quantization `nested_offset`).

bitsandbytes dequantizes (`functional.dequantize_4bit`):
    absmax = code8[q_absmax] * nested_absmax + nested_offset      # only with double quantization, fp32
    weight = code4[q] * absmax                                     # fp32, then cast to the state's dtype
so multiplying the layer by c = 2^k is multiplying `absmax` by c, or, with double quantization,
`nested_absmax` and `nested_offset` by c (the uint8 codes are scale-free: a product and a sum of
two scaled terms scale exactly while they stay normal in fp32). The packed weight, the uint8
absmax codes and both code tables stay byte-identical. halfsafe reads each weight in fp32
(`dequantize_4bit` with the state's dtype set to float32), where the rescaled layer is exactly c
times the input's; every rescaled module is dequantized so both ways and refused, naming it and
the count, unless it is, weight for weight.

The quant state's dtype (float16, for a model loaded in float16 and quantized) is what
bitsandbytes rounds each dequantized weight to before its matmul: the float16 run's own rounding,
as a dense float16 checkpoint's weights are rounded. There, a rescaled weight below float16's
smallest normal (6.1e-5) rounds as a subnormal: on the nf4 demo at 2^-3, 611 of the 50,135,040
weights it rescales (measured, `tests/test_quantized_bnb.py`). The fp32 gate does not see that
rounding; verification in float16 does.

8-bit checkpoints (LLM.int8) are refused: their matmul splits activation columns at
`llm_int8_threshold`, which a rescaled residual stream moves across, so no rescaling is exact.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import HalfsafeError
from .packed import PackedFormat, scaled_scales, unwritable
from .scale import Scale

QUANT_TYPES = ("nf4", "fp4")
STATE = "weight.quant_state.bitsandbytes__"  # + quant type: the JSON leaf, one per quantized module
TENSOR_LEAVES = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map")


def _refuse(directory: Path, what: str) -> HalfsafeError:
    return unwritable(directory, "a bitsandbytes checkpoint", what,
                      "cannot write (it writes bitsandbytes 4-bit nf4 and fp4 checkpoints stored as uint8)",
                      "quantize the fixed checkpoint (load_in_4bit)")


class BitsAndBytesFormat(PackedFormat):
    # `weight` is both the packed tensor and the dequantized parameter's name, so a module is
    # found by its quant-state leaf and its leaves are dotted; `PACKED` / `SCALE` keep the base
    # class's meaning for what is printed and tested.
    PACKED, SCALE = "weight", "weight.absmax"
    LEAVES = TENSOR_LEAVES
    label = "bitsandbytes"
    # Layer-wise reading and writing assume one scale leaf per module (`packed`); not written for
    # this naming yet, so `--layerwise` refuses it in one line (model.loading).
    streamed_writer = None

    def __init__(self, directory: Path, config: dict, functional, utils):
        self._functional, self._utils = functional, utils
        self._exact: set[tuple[str, float]] = set()  # (module, factor) already proven exact
        self._module_set: set[str] | None = None
        super().__init__(directory, config)

    def describe(self) -> str:
        double = ", double quantization" if self.config.get("bnb_4bit_use_double_quant") else ""
        compute = self.config.get("bnb_4bit_compute_dtype") or "float32"
        return f"4-bit {self.config.get('bnb_4bit_quant_type', 'fp4')} (compute {compute}{double})"

    @classmethod
    def open(cls, directory: Path, config: dict) -> BitsAndBytesFormat:
        if config.get("load_in_8bit") or config.get("_load_in_8bit"):
            raise _refuse(directory, "8-bit weights (LLM.int8: its matmul splits activations at "
                                     "llm_int8_threshold, which a rescaled stream moves across)")
        if not (config.get("load_in_4bit") or config.get("_load_in_4bit")):
            raise _refuse(directory, "neither load_in_4bit nor load_in_8bit set")
        if config.get("bnb_4bit_quant_type", "fp4") not in QUANT_TYPES:
            raise _refuse(directory, f"quant type '{config.get('bnb_4bit_quant_type')}'")
        storage = config.get("bnb_4bit_quant_storage") or "uint8"
        if storage != "uint8":
            raise _refuse(directory, f"4-bit codes stored as {storage} (bnb_4bit_quant_storage)")
        try:
            from bitsandbytes import functional, utils
        except ImportError as exc:
            raise HalfsafeError(f"'{directory}' is a bitsandbytes checkpoint; reading it needs the package "
                                "bitsandbytes: pip install 'halfsafe[quantized]'") from exc
        return cls(directory, config, functional, utils)

    # --- the stored layout -------------------------------------------------------------------

    def quantized_modules(self) -> list[str]:
        return sorted(name.split("." + STATE)[0] for name in self.stored() if _is_state(name))

    def _module_of(self, parameter: str) -> str | None:
        module, _, leaf = parameter.rpartition(".")
        return module if leaf == "weight" and module in self._modules() else None

    def _modules(self) -> set[str]:
        if self._module_set is None:
            self._module_set = set(self.quantized_modules())
        return self._module_set

    def _module_tensors(self, module: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The module's stored tensors in `tensors`, by leaf ('weight', 'weight.absmax', ...)."""
        prefix = module + "."
        return {name[len(prefix):]: tensor for name, tensor in tensors.items()
                if name.startswith(prefix) and (name[len(prefix):] in TENSOR_LEAVES or _is_state(name))}

    def dequantize(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`tensors` with each quantized module's leaves replaced by its `weight` in fp32 [out, in],
        dequantized by bitsandbytes (`QuantState.from_dict`, `dequantize_4bit`)."""
        modules = sorted(name.split("." + STATE)[0] for name in tensors if _is_state(name))
        result = dict(tensors)
        for module in modules:
            leaves = self._module_tensors(module, tensors)
            for leaf in leaves:
                del result[f"{module}.{leaf}"]
            result[f"{module}.weight"] = self._dequantize_module(module, leaves)
        return result

    def _dequantize_module(self, module: str, leaves: dict[str, torch.Tensor]) -> torch.Tensor:
        """One module's weight, code x absmax in fp32, by bitsandbytes ([out, in])."""
        state = {leaf.removeprefix("weight."): tensor for leaf, tensor in leaves.items() if leaf != "weight"}
        try:
            quant_state = self._functional.QuantState.from_dict(state, device=torch.device("cpu"))
            # The state's own dtype (float16, usually) is a run's rounding of the weight, not the weight.
            quant_state.dtype = torch.float32
            return self._functional.dequantize_4bit(leaves["weight"], quant_state)
        except (ValueError, KeyError, RuntimeError, AssertionError) as exc:
            raise self._failed(exc) from exc

    # --- scaling ---------------------------------------------------------------------------

    def stored_changes(self, scales: dict[str, Scale]) -> dict[str, torch.Tensor]:
        """As `PackedFormat.stored_changes`: a quantized module's absmax (or nested absmax and
        offset) times the factor, proven exact through bitsandbytes; dense tensors as the base scales them."""
        dense = {parameter: entry for parameter, entry in scales.items() if self._module_of(parameter) is None}
        changes = super().stored_changes(dense)
        for parameter, entry in scales.items():
            module = self._module_of(parameter)
            if module is not None and entry.factor != 1.0:
                changes.update(self._scaled_module(module, entry))
        return changes

    def _scaled_module(self, module: str, entry: Scale) -> dict[str, torch.Tensor]:
        leaves = self._module_tensors(module, self.stored())
        state_leaf = next(leaf for leaf in leaves if leaf.startswith(STATE))
        if "weight.nested_absmax" in leaves:
            # absmax = code8[q] * nested_absmax + offset: both terms move, the uint8 codes do not.
            nested, bad = scaled_scales(module, "nested_absmax", leaves["weight.nested_absmax"], entry)
            state = self._utils.unpack_tensor_to_dict(leaves[state_leaf])
            offset = float(torch.tensor(state["nested_offset"] * entry.factor, dtype=torch.float64)
                           .to(torch.float32))
            if offset != state["nested_offset"] * entry.factor or (offset != 0 and abs(offset) < _TINY32):
                bad += 1
            state["nested_offset"] = offset
            new = {"weight.nested_absmax": nested, state_leaf: self._utils.pack_dict_to_tensor(state)}
        else:
            absmax, bad = scaled_scales(module, "absmax", leaves["weight.absmax"], entry)
            new = {"weight.absmax": absmax}
        if bad:
            raise self._inexact(module, entry, f"{bad:,} absmax scale(s) outside float32's normal range")
        self._check_exact(module, entry, leaves, new)
        return {f"{module}.{leaf}": tensor for leaf, tensor in new.items()}

    def _check_exact(self, module: str, entry: Scale, leaves: dict, new: dict) -> None:
        """bitsandbytes' fp32 dequantization of the rescaled module must be exactly the factor
        times the input's, weight for weight (compared in float64: no rounding in the comparison)."""
        if (module, entry.factor) in self._exact:
            return
        old = self._dequantize_module(module, leaves)
        got = self._dequantize_module(module, {**leaves, **new})
        wrong = int((got.double() != old.double() * entry.factor).sum())
        if wrong:
            raise self._inexact(module, entry, f"{wrong:,} of {old.numel():,} weights, dequantized by bitsandbytes "
                                f"in fp32, not exactly 2^{round(math.log2(entry.factor))} times the input's")
        self._exact.add((module, entry.factor))

    def _inexact(self, module: str, entry: Scale, what: str) -> HalfsafeError:
        return HalfsafeError(
            f"scaling {module}'s bitsandbytes absmax by 2^{round(math.log2(entry.factor))} would leave {what}; "
            "the fix would not be exact; lower --margin (a smaller rescaling), or quantize the fixed dense model "
            "instead (load_in_4bit)"
        )

    def _moved_tensors(self, changes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every stored tensor of the modules whose absmax (or nested absmax) `changes` moves."""
        stored = self.stored()
        moved = {module for module in self._modules()
                 if f"{module}.weight.absmax" in changes or f"{module}.weight.nested_absmax" in changes}
        tensors = {}
        for module in moved:
            tensors.update({f"{module}.{leaf}": changes.get(f"{module}.{leaf}", tensor)
                            for leaf, tensor in self._module_tensors(module, stored).items()})
        return tensors


_TINY32 = torch.finfo(torch.float32).tiny


def _is_state(name: str) -> bool:
    head, sep, kind = name.rpartition("." + STATE)
    return bool(sep) and bool(head) and kind in QUANT_TYPES
