"""What every weight-only integer format shares: a quantized Linear is packed integers and a
floating scale, and the layer computes `x @ ((q - zero) * scale)^T`.

Multiplying such a layer by c = 2^k is multiplying every scale by c: the packed integers and
zero points do not move, and a power of two times a float is exact while the product stays a
normal number of the scale's dtype (README.md, "Quantized models"), which `scaled_scales` checks,
refusing with the module and the count. So the fixed checkpoint dequantizes to exactly c times
the original's dequantized weight. Everything that is not a quantized Linear (norms, embedding,
biases, an unquantized `lm_head`) is dense and scaled as `dense` does, in its stored dtype.

A format module subclasses `PackedFormat` with the leaf names it stores (`PACKED` marks a
quantized module, `SCALE` is its scale tensor), `describe()` and `dequantize(tensors)`, which
must go through the format's own library, never a re-implementation of its packing. Reading
the checkpoint, building the dense model, the scaled weights verification runs, and the export
(the input's files with only the rescaled tensors changed) live here once.

Two ways to read: `stored()`, every tensor at once (the in-memory path), or one tensor at a time
by name (`tensor`, through the shards' headers): what layer-wise mode uses, so that a 35 GB
checkpoint is never held whole. `read_parameter` dequantizes one quantized weight from its own
stored tensors, and `streamed_writer` writes the fix one unit at a time (`layerwise`): the
input's shards copied, each unit's changed tensors written over their bytes in the copies.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
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
        self._where: dict[str, Path] | None = None  # stored tensor -> its shard (headers only)

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

    def stored_names(self) -> dict[str, Path]:
        """Every stored tensor's name -> its shard, from the shards' headers (no tensor is read)."""
        if self._where is None:
            from safetensors import safe_open

            self._where = {}
            for shard in self.shards:
                with safe_open(str(shard), "pt") as handle:
                    self._where.update((name, shard) for name in handle.keys())
        return self._where

    def tensor(self, name: str) -> torch.Tensor:
        """One stored tensor: from `stored()` once that is read, else from its shard alone (the file
        is closed again: a file kept open stays memory-mapped, its pages resident)."""
        if self._stored is not None:
            return self._stored[name]
        from safetensors import safe_open

        with safe_open(str(self.stored_names()[name]), "pt") as handle:
            return handle.get_tensor(name)

    def quantized_modules(self) -> list[str]:
        return sorted(name[: -len(self.PACKED) - 1] for name in self.stored_names()
                      if name.endswith("." + self.PACKED))

    def _leaves(self, module: str) -> list[str]:
        return [f"{module}.{leaf}" for leaf in self.LEAVES if f"{module}.{leaf}" in self.stored_names()]

    def composite_parameters(self) -> dict[str, list[str]]:
        """Parameter -> the stored tensors it is made of, for each quantized weight
        (`model.layers.3.mlp.down_proj.weight` -> its packed integers, scales, zero points)."""
        return {f"{module}.weight": self._leaves(module) for module in self.quantized_modules()}

    def read_parameter(self, parameter: str) -> torch.Tensor:
        """One quantized weight in fp32, dequantized by the format's library from its own stored
        tensors only (each read from disk by name)."""
        module = parameter.rpartition(".")[0]
        return self.dequantize({name: self.tensor(name) for name in self._leaves(module)})[parameter].float()

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
        config = without_quantization(AutoConfig.from_pretrained(str(self.directory),
                                                                 trust_remote_code=trust_remote_code))
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
        return module if leaf == "weight" and f"{module}.{self.PACKED}" in self.stored_names() else None

    def stored_changes(self, scales: dict[str, Scale]) -> dict[str, torch.Tensor]:
        """Stored tensor -> its new value, for every parameter that `scales` moves: a quantized
        weight's scale tensor times the factor, a dense tensor as `dense` scales it, each in the
        dtype the checkpoint stores it in. Refuses a scale that would leave the normal numbers.
        Reads only the tensors it changes (and, for a scale that leaves the normal numbers, its module's)."""
        changes = {}
        for parameter, entry in scales.items():
            if entry.factor == 1.0:
                continue
            module = self._module_of(parameter)
            if module is not None:
                name = f"{module}.{self.SCALE}"
                changes[name] = self._scaled_scales(module, self.tensor(name), entry)
            elif parameter in self.stored_names():
                stored = self.tensor(parameter)
                changes[parameter] = scaled_tensor(parameter, stored, entry, stored.dtype)
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
            before = {name: self.tensor(name) for name in self._leaves(module)}
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

    def _moved_tensors(self, changes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every stored tensor of the quantized modules whose scale `changes` moves, as changed."""
        moved = {name.rpartition(".")[0] for name in changes if name.endswith("." + self.SCALE)}
        return {name: changes[name] if name in changes else self.tensor(name)
                for module in moved for name in self._leaves(module)}

    def scaled_weights(self, model: nn.Module, scales: dict[str, Scale], dtype: torch.dtype, *,
                       only: set[str] | None = None) -> dict[str, torch.Tensor]:
        """The model's parameters as the fixed checkpoint stores them, dequantized by the format's
        library and cast to `dtype`: what the exported checkpoint computes (the model is untouched).
        `only`: those parameters (the others may be on the meta device: a layer-wise unit)."""
        changes = self.stored_changes(scales if only is None else {n: s for n, s in scales.items() if n in only})
        # Only the moved layers are dequantized again; the others' dequantized weights are the model's.
        tensors = self._moved_tensors(changes)
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
        self.write_files(directory, model)

    def write_files(self, directory: Path, model: nn.Module) -> None:
        """Everything but the weights: the input's files as they are (index, tokenizer, recipe,
        generation config), config.json with the fix's eps, dtype and `halfsafe` block."""
        for path in self.directory.iterdir():
            if path.is_file() and path.suffix != ".safetensors" and path.name not in ("config.json", "README.md"):
                shutil.copyfile(path, directory / path.name)
        config = json.loads((self.directory / "config.json").read_text(encoding="utf-8"))
        (directory / "config.json").write_text(json.dumps(fixed_config(config, model), indent=2, sort_keys=True)
                                               + "\n", encoding="utf-8")

    # --- writing one unit at a time (layer-wise) ------------------------------------------

    def output_bytes(self, fp32_bytes: int, dtype: torch.dtype) -> int:
        """The fixed checkpoint's size on disk: the input's shards, whatever the target dtype."""
        return sum(shard.stat().st_size for shard in self.shards)

    def streamed_writer(self, source, scales: dict[str, Scale], dtype: torch.dtype) -> PackedStream:
        return PackedStream(self, scales)


class PackedStream:
    """The in-memory `write`, one unit at a time: the input's shards copied first (the packed
    integers and every tensor the fix does not move are their bytes), then each unit's changed
    tensors (`stored_changes` of its parameters, which have the dtype and shape of the tensors
    they replace) written over those tensors' bytes in the copies. A unit's changes are computed
    from the input, so writing them again after an interruption gives the same bytes: a resumed
    run rewrites the unit it was in and skips those recorded as done."""

    def __init__(self, weights: PackedFormat, scales: dict[str, Scale]):
        self.weights, self.scales = weights, scales
        self.covered: set[str] = set()  # the parameters the units named

    def start(self, target: Path) -> None:
        for shard in self.weights.shards:
            if not (target / shard.name).exists():
                temporary = target / (shard.name + ".tmp")
                shutil.copyfile(shard, temporary)
                temporary.replace(target / shard.name)

    def unit(self, target: Path, index: int, count: int, names: list[str]) -> None:
        self.covered.update(names)
        done = target.parent / "patched-units.txt"  # beside the checkpoint in the work directory
        finished = set(done.read_text().split()) if done.exists() else set()
        if str(index) in finished:
            return
        changes = self.weights.stored_changes({n: s for n, s in self.scales.items() if n in names})
        where = self.weights.stored_names()
        for name, tensor in changes.items():
            overwrite_tensor(target / where[name].name, name, tensor)
        with done.open("a") as handle:
            handle.write(f"{index}\n")

    def finish(self, target: Path, model: nn.Module, tokenizer) -> None:
        moved = {n for n, s in self.scales.items() if s.factor != 1.0}
        if moved - self.covered:
            name = sorted(moved - self.covered)[0]
            raise HalfsafeError(f"the fix scales {name}, which no layer-wise unit of '{self.weights.directory}' "
                                "holds; halfsafe cannot write it layer by layer: drop --layerwise")
        (target.parent / "patched-units.txt").unlink(missing_ok=True)
        self.weights.write_files(target, model)


_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}


def unwritable(directory: Path, checkpoint: str, what: str, writes: str,
               quantize: str = "quantize the fixed checkpoint") -> HalfsafeError:
    """The one-line refusal of a layout a format reads but does not write: what it is, what
    halfsafe writes, and the way round (fix the dense model, then quantize it)."""
    return HalfsafeError(f"'{directory}' is {checkpoint} with {what}, which halfsafe {writes}; fix the dense model it "
                         f"came from with 'halfsafe fix', then {quantize}")


def overwrite_tensor(path: Path, name: str, tensor: torch.Tensor) -> None:
    """Write `tensor` over the bytes of the stored tensor `name` in the safetensors file `path`
    (an 8-byte little-endian header length, the JSON header, then each tensor's raw little-endian
    bytes at its `data_offsets`): the header and every other tensor stay byte for byte."""
    with path.open("r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        entry = json.loads(handle.read(length))[name]
        begin, end = entry["data_offsets"]
        data = tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        if (entry["dtype"], entry["shape"], end - begin) != (_SAFETENSORS_DTYPES.get(tensor.dtype),
                                                             list(tensor.shape), len(data)):
            raise HalfsafeError(f"{path.name} stores {name} as {entry['dtype']} {entry['shape']}, not as the fix's "
                                f"{dtype_name(tensor.dtype)} {list(tensor.shape)}; halfsafe cannot write it in place")
        handle.seek(8 + length + begin)
        handle.write(data)


def without_quantization(config):
    """`config` (a transformers config, changed in place) without its `quantization_config`, top
    level and text config: the model it builds is a plain fp32 one, its weights read through the format."""
    for holder in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
        if hasattr(holder, "quantization_config"):
            del holder.quantization_config
    return config


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
