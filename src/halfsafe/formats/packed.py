"""What every weight-only integer format shares: a quantized Linear is packed integers and a
floating scale, and the layer computes `x @ ((q - zero) * scale)^T`.

Multiplying such a layer by c = 2^k is multiplying every scale by c: the packed integers and
zero points do not move, and a power of two times a float is exact while the product stays a
normal number of the scale's dtype (NUMERICS.md section 9), which `scaled_scales` checks,
refusing with the module and the count. So the fixed checkpoint dequantizes to exactly c times
the original's dequantized weight. Everything that is not a quantized Linear (norms, embedding,
biases, an unquantized `lm_head`) is dense and scaled as `dense` does, in its stored dtype.

A format module subclasses `PackedFormat` with the leaf names it stores (`PACKED` marks a
quantized module, `SCALE` is its scale tensor), `describe()` and `dequantize(tensors)`, which
must go through the format's own library, never a re-implementation of its packing. Reading
the checkpoint, building the dense model, the scaled weights verification runs, and the export
(the input's files with only the rescaled tensors changed) live here once.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from torch import nn

from ..dtypes import dtype_name
from ..errors import HalfsafeError
from .scale import Scale, scaled_tensor


class PackedFormat:
    quantized = True
    PACKED: str = ""  # the leaf that marks a quantized module (its packed integers)
    SCALE: str = ""  # the leaf of its floating scale, the one tensor a fix moves
    LEAVES: tuple[str, ...] = ()  # every leaf a quantized module stores
    label = ""  # 'compressed-tensors', 'GPTQ', ...

    def __init__(self, directory: Path, config: dict):
        self.directory, self.config = directory, config
        self.name = f"{self.label} {self.describe()}"
        self.shards = sorted(directory.glob("*.safetensors"))
        self._stored: dict[str, torch.Tensor] | None = None

    def describe(self) -> str:
        raise NotImplementedError

    def dequantize(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`tensors` (name -> stored tensor; not changed) with each quantized module's stored
        leaves replaced by its `weight` in fp32, through the format's library."""
        raise NotImplementedError

    # --- reading -------------------------------------------------------------------------

    def stored(self) -> dict[str, torch.Tensor]:
        """Every tensor as the checkpoint stores it (read once)."""
        if self._stored is None:
            from safetensors.torch import load_file

            self._stored = {}
            for shard in self.shards:
                self._stored.update(load_file(str(shard)))
        return self._stored

    def quantized_modules(self) -> list[str]:
        return sorted(name[: -len(self.PACKED) - 1] for name in self.stored() if name.endswith("." + self.PACKED))

    def _failed(self, exc: Exception) -> HalfsafeError:
        return HalfsafeError(f"{self.label} could not dequantize '{self.directory}': "
                             f"{str(exc).splitlines()[0][:300]}; copy or download the checkpoint again")

    def dense_model(self, *, dtype: torch.dtype, trust_remote_code: bool = False, extra: dict | None = None
                    ) -> nn.Module:
        """The model with every weight dequantized to fp32 (then cast to `dtype`), as a plain
        transformers model with no quantizer attached: what observe, plan and the gate run on."""
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

        extra = dict(extra or {})
        if extra.pop("device_map", None) is not None:
            raise HalfsafeError("--device-map is not supported for quantized checkpoints yet; use --device")
        config = AutoConfig.from_pretrained(str(self.directory), trust_remote_code=trust_remote_code)
        for holder in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
            if hasattr(holder, "quantization_config"):
                del holder.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code,
                                                 **extra)
        dense = {name: tensor.float() for name, tensor in self.dequantize(self.stored()).items()
                 if tensor.is_floating_point()}
        missing, unexpected = model.load_state_dict(dense, strict=False)
        tied = {name for name, param in model.named_parameters(remove_duplicate=False)
                if param is model.get_input_embeddings().weight}
        missing = [m for m in missing if m not in tied]
        if missing or unexpected:
            what = f"no tensor for {missing[0]}" if missing else f"a tensor {unexpected[0]} the model does not have"
            raise HalfsafeError(f"the {self.label} checkpoint '{self.directory}' does not match its config: "
                                f"{what} ({len(missing)} missing, {len(unexpected)} unexpected); "
                                "copy or download the checkpoint again")
        if (self.directory / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(str(self.directory))
        model.config.name_or_path = str(self.directory)
        return model.to(dtype)

    # --- scaling ---------------------------------------------------------------------------

    def _module_of(self, parameter: str) -> str | None:
        """The quantized module whose dequantized weight `parameter` is, or None if it is dense."""
        module, _, leaf = parameter.rpartition(".")
        return module if leaf == "weight" and f"{module}.{self.PACKED}" in self.stored() else None

    def stored_changes(self, scales: dict[str, Scale]) -> dict[str, torch.Tensor]:
        """Stored tensor -> its new value, for every parameter that `scales` moves: a quantized
        weight's scale tensor times the factor, a dense tensor as `dense` scales it, each in the
        dtype the checkpoint stores it in. Refuses a scale that would leave the normal numbers."""
        stored, changes = self.stored(), {}
        for parameter, entry in scales.items():
            if entry.factor == 1.0:
                continue
            module = self._module_of(parameter)
            if module is not None:
                name = f"{module}.{self.SCALE}"
                changes[name] = self._scaled_scales(module, stored[name], entry)
            elif parameter in stored:
                changes[parameter] = scaled_tensor(parameter, stored[parameter], entry, stored[parameter].dtype)
            else:
                raise HalfsafeError(f"the fix scales {parameter}, which the {self.label} checkpoint "
                                    f"'{self.directory}' does not store under that name; halfsafe cannot write it")
        return changes

    def _scaled_scales(self, module: str, scale: torch.Tensor, entry: Scale) -> torch.Tensor:
        """The module's scales x the factor, refused unless the module still dequantizes to
        exactly factor x its weight. Every scale that stays a normal number is exact; one that
        does not (subnormal, zero, infinite) is exact only where its group's integers equal their
        zero point (a group of zeros: AWQ and vLLM store it with a clamped, subnormal float16
        scale), which the format's library says by dequantizing the module both ways."""
        new, bad = scaled_scales(module, self.SCALE, scale, entry)
        if bad:
            leaves = {f"{module}.{leaf}" for leaf in self.LEAVES}
            before = {name: tensor for name, tensor in self.stored().items() if name in leaves}
            weight = f"{module}.weight"
            old_weight = self.dequantize(before)[weight]
            new_weight = self.dequantize({**before, f"{module}.{self.SCALE}": new})[weight]
            if not torch.equal(new_weight, old_weight * entry.factor):
                power = round(math.log2(entry.factor))
                raise HalfsafeError(
                    f"scaling {module}'s {self.SCALE} ({dtype_name(scale.dtype)}) by 2^{power} "
                    f"would leave {bad:,} of {scale.numel():,} scales outside the normal {dtype_name(scale.dtype)} "
                    f"range (normal: {torch.finfo(scale.dtype).tiny:.3g} to {torch.finfo(scale.dtype).max:.3g}), "
                    "losing their bits; the fix would not be exact; lower --margin (a smaller rescaling), or "
                    "quantize the fixed dense model instead"
                )
        return new

    def scaled_weights(self, model: nn.Module, scales: dict[str, Scale], dtype: torch.dtype, *,
                       only: set[str] | None = None) -> dict[str, torch.Tensor]:
        """The model's parameters as the fixed checkpoint stores them, dequantized by the format's
        library and cast to `dtype`: what the exported checkpoint computes (the model is untouched)."""
        changes = self.stored_changes(scales)
        stored = self.stored()
        moved = {name.rpartition(".")[0] for name in changes if name.endswith("." + self.SCALE)}
        # Only the moved layers are dequantized again; the others' dequantized weights are the model's.
        tensors = {name: changes.get(name, tensor) for name, tensor in stored.items()
                   if name.rpartition(".")[0] in moved and name.rpartition(".")[2] in self.LEAVES}
        dequantized = self.dequantize(tensors) if tensors else {}
        weights = {}
        for name, param in model.named_parameters():
            if not param.is_floating_point() or (only is not None and name not in only):
                continue
            if name in dequantized:
                weights[name] = dequantized[name].to(dtype)
            elif name in changes:
                weights[name] = changes[name].to(dtype)
            else:
                weights[name] = param.detach().to(dtype)
        return weights

    # --- writing ---------------------------------------------------------------------------

    def write(self, directory: Path, model: nn.Module, tokenizer, scales: dict[str, Scale]) -> None:
        """The input checkpoint's files with only the rescaled tensors changed: every other tensor
        byte for byte (safetensors stores raw bytes), its shards, index, tokenizer, recipe and
        quantization_config as they were; config.json gains the fix's eps, dtype and `halfsafe` block."""
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        changes = self.stored_changes(scales)
        for shard in self.shards:
            with safe_open(str(shard), "pt") as handle:
                names, metadata = set(handle.keys()), handle.metadata()
            if names.isdisjoint(changes):
                shutil.copyfile(shard, directory / shard.name)
                continue
            tensors = load_file(str(shard))
            tensors.update({name: value for name, value in changes.items() if name in names})
            save_file(tensors, str(directory / shard.name), metadata=metadata)
        for path in self.directory.iterdir():
            if path.is_file() and path.suffix != ".safetensors" and path.name not in ("config.json", "README.md"):
                shutil.copyfile(path, directory / path.name)
        config = json.loads((self.directory / "config.json").read_text(encoding="utf-8"))
        (directory / "config.json").write_text(json.dumps(fixed_config(config, model), indent=2, sort_keys=True)
                                               + "\n", encoding="utf-8")


def scaled_scales(module: str, leaf: str, scale: torch.Tensor, entry: Scale) -> tuple[torch.Tensor, int]:
    """`scale` x the entry's power of two in the scale's own dtype, and how many of its nonzero
    scales leave the normal numbers (a subnormal scale has lost bits, an overflowed one is infinite)."""
    mantissa, _ = math.frexp(entry.factor)
    if entry.offset or mantissa != 0.5:
        raise HalfsafeError(f"{module}'s quantization {leaf} can only move by a power of two, not by "
                            f"{entry.factor:g} (offset {entry.offset:g}); halfsafe cannot write this fix")
    new = (scale.to(torch.float64) * entry.factor).to(scale.dtype)
    tiny = torch.finfo(scale.dtype).tiny
    bad = ~torch.isfinite(new) | ((new.abs() < tiny) & (scale != 0))
    return new, int(bad.sum())


def fixed_config(config: dict, model: nn.Module) -> dict:
    """The input's config.json (quantization_config and all) with what the fix changes: the eps
    fields it scaled (`halfsafe.roles.eps_fields`), the dtype and the `halfsafe` block."""
    config = json.loads(json.dumps(config))
    block = model.config.halfsafe
    text = model.config.get_text_config()
    for field in (block.get("roles") or {}).get("eps_fields", []):
        holder = config if field in config else config.get("text_config", {})
        if field not in holder:
            raise HalfsafeError(f"config.json has no field '{field}' for the fix's eps; halfsafe cannot write it")
        holder[field] = getattr(text, field)
    name = dtype_name(model.config.dtype) if isinstance(model.config.dtype, torch.dtype) else str(model.config.dtype)
    config["dtype"] = name
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    config["halfsafe"] = block
    return config
