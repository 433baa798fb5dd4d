"""One owner for everything halfsafe attaches to a model: forward hooks, pre-forward hooks, and
entries in transformers' global attention registries.

A hook left behind keeps running on every later forward and keeps its closure (often the model
and a recorder) alive; a registry entry outlives the model altogether. So every attachment goes
through a `HookSet`, which undoes them all, in reverse order, when its `with` block ends, even
when the forward raised:

>>> with HookSet() as hooks:
...     hooks.forward(layer, record)
...     hooks.pre_forward(norm, upcast, with_kwargs=True)
...     name = hooks.attention("halfsafe_observe_sdpa", observed, mask_function)
...     model(**batch)
>>> # every hook removed, both registries as they were

A set that must outlive a block (the keep-fp32 casts, owned by the model they modify) is
created without `with` and removed by its owner with `remove()`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from torch import nn

_serial = itertools.count()  # makes registry names unique across concurrent sets


class HookSet:
    """Hooks and registry entries with one owner; `remove()` (or leaving `with`) undoes them all."""

    def __init__(self):
        self._undo: list[Callable[[], None]] = []

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __len__(self) -> int:
        return len(self._undo)

    def forward(self, module: nn.Module, hook, **options):
        """`module.register_forward_hook(hook, **options)`, owned by this set."""
        handle = module.register_forward_hook(hook, **options)
        self._undo.append(handle.remove)
        return handle

    def pre_forward(self, module: nn.Module, hook, **options):
        """`module.register_forward_pre_hook(hook, **options)`, owned by this set."""
        handle = module.register_forward_pre_hook(hook, **options)
        self._undo.append(handle.remove)
        return handle

    def attention(self, prefix: str, attention: Callable, mask: Callable) -> str:
        """Register an attention kernel and its mask function in transformers' global registries
        under a fresh name starting with `prefix`; returns the name, for `config._attn_implementation`.
        Both entries are deleted on removal."""
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        name = f"{prefix}_{next(_serial)}"
        for registry, function in ((AttentionInterface, attention), (AttentionMaskInterface, mask)):
            registry.register(name, function)
            self._undo.append(lambda registry=registry: registry._global_mapping.pop(name, None))
        return name

    def callback(self, undo: Callable[[], None]) -> None:
        """Any other undo step (restoring an attribute the hooks rely on), run in order with the rest."""
        self._undo.append(undo)

    def remove(self) -> None:
        """Undo everything, newest first; every step runs even if an earlier one raised."""
        undo, self._undo = self._undo, []
        error = None
        for step in reversed(undo):
            try:
                step()
            except Exception as exc:  # finish the others, then raise the first
                error = error or exc
        if error is not None:
            raise error
