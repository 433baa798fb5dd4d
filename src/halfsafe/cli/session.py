"""What every command does around the library: pick a device, load quietly, show progress."""

from __future__ import annotations

import sys
from contextlib import contextmanager

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..diagnosing import Diagnosis, diagnose
from ..dtypes import dtype_name, format_bytes
from ..errors import HalfsafeError
from ..model.loading import DEMO, DEMO_NAME, LoadedModel, is_demo_cached, load_model


def make_console(stderr: bool = False) -> Console:
    """A console for reports: the terminal's width, or 120 columns when piped or captured, so
    tables of numbers are not cut to 80. `stderr` keeps stdout for the generated text."""
    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(width=120, stderr=stderr)


def resolve_device(spec: str) -> torch.device:
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise HalfsafeError(f"unknown device '{spec}'; use cpu, cuda, cuda:N or auto") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HalfsafeError(f"device '{spec}' requested but this torch has no CUDA device; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise HalfsafeError(f"device '{spec}' is not supported; use cpu, cuda, cuda:N or auto")
    return device


@contextmanager
def progress_bar(console: Console, description: str, total: int):
    """A transient bar; yields the callback the library calls once per unit of work."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda: progress.advance(task)


def quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_for_cli(model: str, console: Console, *, dtype: torch.dtype = torch.float32, device: str = "auto",
                 device_map: str | None = None, **kwargs) -> LoadedModel:
    """MODEL in `dtype` (fp32 unless told), on `device`, or spread by an accelerate `device_map`."""
    target = resolve_device(device)
    quiet_transformers()
    announce_demo_build(model, console)
    with console.status(f"loading {model} ..."):
        loaded = load_model(model, dtype=dtype, device_map=device_map, **kwargs)
        if device_map is None:
            loaded.model.to(target)
    return loaded


def announce_demo_build(model: str, console: Console) -> None:
    if model == DEMO and not is_demo_cached():
        console.print("building the demo model once: assembling and dequantising the GGUF (about 90 s)...")


def load_for_generation(model: str, console: Console, *, dtype: str, device: str = "auto",
                        device_map: str | None = None, **kwargs) -> tuple[LoadedModel, list[str]]:
    """Load MODEL to generate in `dtype` ('auto' chooses by hardware); returns notes that say why.

    `auto` on a GPU without bfloat16 means float16 with halfsafe's fix, applied in memory when
    the checkpoint is not already fixed (the same pipeline as `fix`, without verification); a
    model whose roles are refused runs in plain float16, where the guard recovers what overflows.
    """
    from ..advising import choose_dtype
    from ..dtypes import parse_dtype

    notes = []
    if dtype.strip().lower() == "auto":
        choice = choose_dtype(resolve_device(device))
        wanted, fix = choice.dtype, choice.fix
        notes.append(f"dtype auto: {choice.reason}")
    else:
        wanted, fix = parse_dtype(dtype), False
    loaded = load_for_cli(model, console, dtype=torch.float32 if fix else wanted, device=device,
                          device_map=device_map, **kwargs)
    if fix and getattr(loaded.model.config, "halfsafe", None):
        fix = False  # an exported halfsafe checkpoint: already fixed, so only cast
        loaded.model.to(wanted)
        notes.append("the checkpoint is already fixed by halfsafe")
    if fix:
        from ..fixing.fix import fix as fix_model
        from ..prompts import bundled_prompts

        try:
            calibration = fit_to_model(loaded.model, loaded.tokenizer, bundled_prompts(), what="calibration prompts")
            with console.status("fixing for float16 (observe, plan, rescale) ..."):
                fix_model(loaded.model, loaded.tokenizer, dtype=wanted, calibration=calibration, verify=False)
        except HalfsafeError as exc:
            loaded.model.to(wanted)
            notes.append(f"not fixed ({exc}); running plain float16, the guard recovers overflowing steps")
    return loaded, notes


def fit_to_model(model, tokenizer, prompts: list[str], *, reserve: int = 0, what: str) -> list[str]:
    """The prompts cut to the model's positions (less `reserve` generated tokens), with a
    notice on stderr when any was cut: the command line truncates where the library refuses."""
    from ..prompts import fit_prompts

    fitted, notice = fit_prompts(model, tokenizer, prompts, reserve=reserve, what=what)
    if notice:
        print(f"halfsafe: note: {notice}", file=sys.stderr)
    return fitted


def diagnose_with_progress(
    loaded: LoadedModel, prompts: list[str], dtype: torch.dtype, margin: float, console: Console
) -> Diagnosis:
    from ..diagnosing import CONTINUATION_TOKENS

    prompts = fit_to_model(loaded.model, loaded.tokenizer, prompts, reserve=CONTINUATION_TOKENS,
                           what="calibration prompts")
    also = tuple(d for d in (torch.bfloat16,) if d != dtype)
    passes = len(prompts) * (2 + len(also))  # the fp32 observation, then one confirmation per dtype
    with progress_bar(console, f"diagnosing for {dtype_name(dtype)}", passes) as advance:
        return diagnose(
            loaded.model, loaded.tokenizer, prompts, dtype=dtype, also=also, margin=margin,
            name=loaded.name, progress=advance,
        )


def fix_with_progress(loaded: LoadedModel, console: Console, **kwargs):
    from ..fixing.fix import VERIFY_TOKENS, fix
    from ..prompts import CALIBRATION, HELDOUT, bundled_prompts

    model, tokenizer = loaded.model, loaded.tokenizer
    kwargs["calibration"] = fit_to_model(model, tokenizer, kwargs.get("calibration") or bundled_prompts(CALIBRATION),
                                         what="calibration prompts")
    kwargs["heldout"] = fit_to_model(model, tokenizer, kwargs.get("heldout") or bundled_prompts(HELDOUT),
                                     reserve=VERIFY_TOKENS, what="held-out prompts")
    observing = 0 if kwargs.get("observation") is not None else len(kwargs["calibration"])
    passes = observing + len(kwargs["heldout"]) + 1  # observation, verification, greedy run
    with progress_bar(console, "fixing", passes) as advance:
        return fix(loaded.model, loaded.tokenizer, progress=advance, **kwargs)


def compare_with_progress(loaded: LoadedModel, console: Console, texts: list[str], names: list[str], **kwargs):
    from ..comparing import compare
    from ..prompts import bundled_prompts

    model, tokenizer = loaded.model, loaded.tokenizer
    texts = fit_to_model(model, tokenizer, texts, reserve=kwargs.get("new_tokens", 32), what="texts")
    kwargs["calibration"] = fit_to_model(model, tokenizer, kwargs.get("calibration") or bundled_prompts(),
                                         what="calibration prompts")
    passes = len(texts) + len(names)  # one forward per text for every variant, then greedy per variant
    with progress_bar(console, "comparing", passes) as advance:
        return compare(model, tokenizer, texts, names, progress=advance, **kwargs)


# -- layer-wise ------------------------------------------------------------------------------


def open_layerwise_for_cli(args, console: Console, max_memory: int | None):
    """MODEL's skeleton and tokenizer, for the layer-wise path."""
    from ..layerwise.jobs import open_layerwise
    from ..model.checks import check_vocabulary
    from ..model.loading import load_tokenizer, resolve_checkpoint_dir

    target = resolve_device(args.device)
    quiet_transformers()
    announce_demo_build(args.model, console)
    path = resolve_checkpoint_dir(args.model, allow_pickle=False)
    tokenizer = load_tokenizer(path, trust_remote_code=args.trust_remote_code)
    lm = open_layerwise(path, device=target, max_memory=max_memory, trust_remote_code=args.trust_remote_code,
                        attn_implementation=args.attn_implementation)
    check_vocabulary(lm.model, tokenizer, path)
    unit, size = lm.largest_unit()
    console.print(f"layer-wise: {lm.num_layers} layers; the largest unit ({unit}) takes {format_bytes(size)} in fp32",
                  highlight=False)
    return lm, tokenizer


def diagnose_layerwise_with_progress(args, console: Console, prompts: list[str], dtype: torch.dtype,
                                     max_memory: int | None) -> Diagnosis:
    from ..layerwise.jobs import diagnose_layerwise

    lm, tokenizer = open_layerwise_for_cli(args, console, max_memory)
    prompts = fit_to_model(lm.model, tokenizer, prompts, what="calibration prompts")
    also = tuple(d for d in (torch.bfloat16,) if d != dtype)
    with progress_bar(console, "diagnosing layer by layer", lm.num_layers * (2 + len(also))) as advance:
        return diagnose_layerwise(lm, tokenizer, prompts, dtype=dtype, also=also, margin=args.margin,
                                  name=args.model if args.model != DEMO else DEMO_NAME, progress=advance)


def fix_layerwise_with_progress(args, console: Console, *, max_memory: int | None, **kwargs):
    from ..layerwise.jobs import fix_layerwise
    from ..prompts import CALIBRATION, HELDOUT, bundled_prompts

    lm, tokenizer = open_layerwise_for_cli(args, console, max_memory)
    kwargs["calibration"] = fit_to_model(lm.model, tokenizer, kwargs.get("calibration") or bundled_prompts(CALIBRATION),
                                         what="calibration prompts")
    kwargs["heldout"] = fit_to_model(lm.model, tokenizer, kwargs.get("heldout") or bundled_prompts(HELDOUT),
                                     what="held-out prompts")
    verify = not args.no_verify
    steps = lm.num_layers * (2 if verify else 1) + lm.num_layers + 1  # observe, verify, export (+ outer unit)
    with progress_bar(console, "fixing layer by layer", steps) as advance:
        return fix_layerwise(lm, tokenizer, args.out, margin=args.margin, max_kl=args.max_kl, verify=verify,
                             overwrite=args.overwrite, progress=advance, **kwargs)
