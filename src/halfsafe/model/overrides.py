"""What cannot be derived from a model, as data: `data/overrides.json`, keyed by class name.

`fix` derives everything else from the model itself (`roles/`) and proves it exact, so an entry
exists only where the model cannot tell: each says why. Kinds:
- `layers`: the path of the decoder-layer stack, where its length does not match the config's
  `num_hidden_layers` (the stack is otherwise found by that length).
A new kind comes with the first model that needs it.

An entry is resolved once per model: its paths become the module objects they name (an entry
naming a module the model lacks is an error, never skipped), and the code that uses them compares
modules by identity. A subclass of a listed class (a user's own wrapper) takes its entry.
Adding one: a few lines of data here and a tiny model of the type in tests/test_overrides.py.
A user's own entries, in a file of the same form, come in through `--overrides FILE` (or
`extra_overrides` in Python) and take precedence for the classes they name.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from torch import nn

from ..errors import HalfsafeError

KINDS = ("layers",)


@dataclass(frozen=True)
class Override:
    model_class: str
    why: str
    layers: str | None = None


@dataclass(frozen=True)
class Resolved:
    """An override turned into the model's own objects."""
    entry: Override | None
    layers: tuple[str, nn.ModuleList] | None = None


@cache
def packaged() -> dict[str, Override]:
    return parse(json.loads(resources.files("halfsafe").joinpath("data/overrides.json").read_text()))


_extra: dict[str, Override] = {}  # a user's entries, while `extra_overrides` is active


def overrides() -> dict[str, Override]:
    """Every entry in force: halfsafe's, and a user's over them."""
    return {**packaged(), **_extra}


@contextmanager
def extra_overrides(table: dict[str, Override]) -> Iterator[None]:
    """Use a user's entries (`read_overrides`' result) inside the block."""
    saved = dict(_extra)
    _extra.update(table)
    _resolved.clear()
    try:
        yield
    finally:
        _extra.clear()
        _extra.update(saved)
        _resolved.clear()


def read_overrides(path: str | Path) -> dict[str, Override]:
    """A user's overrides file: JSON mapping a model class's name to {"why": ..., "layers": ...}."""
    form = 'a JSON object mapping a model class name to {"why": "...", "layers": "model.layers"}'
    try:
        data = json.loads(Path(path).expanduser().read_text())
    except FileNotFoundError:
        raise HalfsafeError(f"--overrides {path}: no such file; give {form}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HalfsafeError(f"--overrides {path} cannot be read ({exc.__class__.__name__}); give {form}") from None
    except json.JSONDecodeError as exc:
        raise HalfsafeError(f"--overrides {path} is not JSON ({exc.msg}, line {exc.lineno}); give {form}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise HalfsafeError(f"--overrides {path} is not {form}")
    try:
        return parse(data)
    except HalfsafeError as exc:
        raise HalfsafeError(f"--overrides {path}: {exc}") from None


def parse(data: dict) -> dict[str, Override]:
    """Entries from their JSON form; an unknown kind or a missing reason is an error naming the entry."""
    found = {}
    for name, entry in data.items():
        unknown = sorted(set(entry) - {"why", *KINDS})
        if unknown or not entry.get("why") or not set(entry) & set(KINDS):
            raise HalfsafeError(f"override '{name}' must give 'why' and one of {', '.join(KINDS)}"
                                + (f"; unknown key(s): {', '.join(unknown)}" if unknown else ""))
        if not all(isinstance(entry[k], str) for k in entry):
            raise HalfsafeError(f"override '{name}': every value must be a string")
        found[name] = Override(model_class=name, **entry)
    return found


_resolved: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> Resolved


def resolve(model: nn.Module, table: dict[str, Override] | None = None) -> Resolved:
    """The override for `model`'s class (or the nearest base class listed), resolved to its modules."""
    cached = table is None
    if cached and model in _resolved:
        return _resolved[model]
    table = overrides() if table is None else table
    entry = next((table[c.__name__] for c in type(model).__mro__ if c.__name__ in table), None)
    layers = None
    if entry is not None and entry.layers is not None:
        try:
            stack = model.get_submodule(entry.layers)
        except AttributeError:
            stack = None
        if not isinstance(stack, nn.ModuleList):
            raise HalfsafeError(f"the override for {entry.model_class} says the decoder layers are "
                                f"'{entry.layers}', which {type(model).__name__} does not have as a module list; "
                                "use --strategy keep-fp32 and report the model's class")
        layers = (entry.layers, stack)
    resolved = Resolved(entry, layers)
    if cached:
        _resolved[model] = resolved
    return resolved
