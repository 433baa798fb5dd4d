"""The checkpoint on disk: safetensors files read one tensor at a time (memory-mapped), and its
layout: which stored tensors make each of the model's parameters, and how they are written back."""

from __future__ import annotations

import hashlib
import json
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import HalfsafeError


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


@dataclass
class _Group:
    """Stored tensors that make parameters together: one tensor read as is (`converter` None),
    several that transformers' `converter` turns into `targets` (per-expert tensors stacked into
    one, say), or a quantized weight's tensors that its weight format dequantizes (`format`)."""
    first: str  # the parameter transformers names the group by
    converter: object | None
    sources: list[tuple[str, str]] = field(default_factory=list)  # (tensor name on disk, source pattern)
    targets: list[str] = field(default_factory=list)  # the parameters it makes
    format: object | None = None  # `formats`: reads `first` from `sources` (`read_parameter`)


class Layout:
    """The checkpoint's tensors as the model's parameters, through transformers' own loading rules
    (`conversion_mapping`): renamings (Gemma 3's `language_model.model.*` on disk is
    `model.language_model.*` in memory) and conversions (Mixtral's `block_sparse_moe.experts.N.w1`,
    `w3` on disk are one stacked `mlp.experts.gate_up_proj` in memory). Reading a parameter reads its
    group's tensors and converts them as `from_pretrained` does; `stored` maps parameters back with
    the reverse of the transforms the checkpoint used, as `save_pretrained` does for a loaded model.
    A parameter that the checkpoint's weight format stores as several tensors (a quantized weight:
    packed integers, scales, zero points) is read through the format, as its in-memory loading
    reads it: under the parameter's own name, dequantized to fp32.
    """

    def __init__(self, model: nn.Module, checkpoint: Checkpoint, weights_format=None):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, dot_natural_key, rename_source_key

        self.model, self.checkpoint = model, checkpoint
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
        meta, prefix = model.state_dict(), model.base_model_prefix
        self._shapes = {name: tensor.shape for name, tensor in meta.items()}
        groups: dict[str, _Group] = {}
        # As `convert_and_load_state_dict_in_model` walks them: in natural order (expert 2 before 10).
        for key in sorted(checkpoint.keys(), key=dot_natural_key):
            name, pattern = rename_source_key(key, renamings, converters, prefix, meta)
            if name not in meta and key in meta:
                name, pattern = rename_source_key(key, [], [], prefix, meta)
            if name not in meta:
                continue  # not one of the model's tensors: transformers ignores it too
            converter = by_pattern[pattern] if pattern is not None else None
            group = groups.setdefault(name, _Group(name, converter))
            group.sources.append((key, pattern if converter is not None else key))
        composite = weights_format.composite_parameters() if weights_format is not None else {}
        for name, keys in composite.items():
            if name not in meta:
                raise HalfsafeError(
                    f"'{checkpoint.directory}' stores a quantized {name} ({keys[0]}) that the model of its config.json "
                    f"does not have; the weights and the config do not match: use a complete checkpoint"
                )
            groups[name] = _Group(name, None, [(key, key) for key in keys], format=weights_format)
        self._groups: dict[str, _Group] = {}  # parameter -> its group
        for group in groups.values():
            if group.converter is None:
                group.targets = [group.first]
            else:  # a one-to-many conversion makes each target pattern's parameter (qkv -> q, k, v)
                first = group.converter.target_patterns[0]
                group.targets = [group.first.replace(first, t) for t in group.converter.target_patterns]
            for target in group.targets:
                self._groups[target] = group
        # What `from_pretrained` keeps for `save_pretrained` to reverse: the transforms the checkpoint used.
        model._weight_conversions = [t for t in transforms if t.was_used()]

    def __contains__(self, name: str) -> bool:
        return name in self._groups

    def together(self, names: list[str]) -> list[list[str]]:
        """`names` in sets that are read and written together (one per group), in order."""
        sets: dict[int, list[str]] = {}
        for name in names:
            sets.setdefault(id(self._groups[name]), []).append(name)
        return list(sets.values())

    def check_units(self, unit_of) -> None:
        """Refuse a group whose parameters lie in different units (`unit_of(name)`): it could not be
        read, nor written back, one unit at a time."""
        for group in {id(g): g for g in self._groups.values()}.values():
            units = {unit_of(t) for t in group.targets}
            if len(units) > 1:
                raise HalfsafeError(
                    f"'{self.checkpoint.directory}' stores {group.sources[0][0]} in a layout transformers converts "
                    f"into {', '.join(group.targets)}, which lie in different units ({', '.join(map(str, units))}); "
                    "layer-wise mode reads one unit at a time and cannot do that; use the in-memory path"
                )

    def read(self, names: list[str], dtype: torch.dtype | None = torch.float32,
             device="cpu") -> dict[str, torch.Tensor]:
        """The parameters `names` (in `dtype`, or as stored if None), each group read and converted once."""
        tensors = {}
        for group in {id(self._groups[n]): self._groups[n] for n in names}.values():
            tensors.update(self._read(group, dtype, device))
        for name in names:
            self._check_shape(name, tensors[name])
        return {name: tensors[name] for name in names}

    def _check_shape(self, name: str, tensor: torch.Tensor) -> None:
        """A stored shape the configuration does not have (an expert's tensors missing: fewer stacked)."""
        if tensor.shape != self._shapes[name]:
            sources = [key for key, _ in self._groups[name].sources]
            shown = ", ".join(sources[:2]) + (f" and {len(sources) - 2} more" if len(sources) > 2 else "")
            raise HalfsafeError(
                f"'{self.checkpoint.directory}' makes {name} of shape {list(tensor.shape)} from {shown}, but its "
                f"config.json says {list(self._shapes[name])}; the weights and the config do not match: use a "
                "complete checkpoint"
            )

    def _read(self, group: _Group, dtype, device) -> dict[str, torch.Tensor]:
        if group.format is not None:  # dequantized: fp32 is what it is "as stored" too
            tensor = group.format.read_parameter(group.first)
            return {group.first: tensor.to(device=device, dtype=dtype or torch.float32)}
        if group.converter is None:
            return {group.first: self.checkpoint.load(group.sources[0][0], dtype=dtype, device=device)}
        converter = deepcopy(group.converter)  # it collects tensors: one instance per group, as transformers does
        for key, pattern in group.sources:
            # Callables: read one at a time when the conversion asks for them (transformers' sync loading).
            converter.add_tensor(group.first, key, pattern, lambda key=key: self.checkpoint.load(key, dtype, device))
        converted = converter.convert(group.first, model=self.model, config=self.model.config)
        return {name: value[0] if isinstance(value, list) else value for name, value in converted.items()}

    def stored(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Parameters -> the tensors `save_pretrained` writes for them, names and layout as the
        in-memory model (loaded by `from_pretrained`) saves them. `tensors` holds whole groups."""
        from transformers.core_model_loading import revert_weight_conversion

        return revert_weight_conversion(self.model, tensors)
