"""What each subcommand does: check its arguments, load, call the library, render, write."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from ..errors import HalfsafeError

EXIT_UNSAFE = 3


def _load(args, console):
    from .session import load_for_cli

    return load_for_cli(args.model, console, device=args.device, device_map=args.device_map,
                        allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                        attn_implementation=args.attn_implementation)


def _check_margin(margin: float) -> None:
    if not (math.isfinite(margin) and margin >= 1):
        raise HalfsafeError(f"--margin {margin} must be a finite number of at least 1: a factor below the dtype's "
                            "maximum; pass e.g. 2")


def _check_layerwise(args) -> int | None:
    """The layer-wise options, checked before anything loads; returns --max-memory in bytes."""
    if not args.layerwise:
        if args.max_memory:
            raise HalfsafeError("--max-memory applies to --layerwise; add --layerwise, or drop --max-memory")
        return None
    if args.device_map:
        raise HalfsafeError("--device-map is for the in-memory path; with --layerwise use --device")
    from ..layerwise.jobs import parse_memory

    return parse_memory(args.max_memory) if args.max_memory else None


def run_diagnose(args) -> int:
    from ..dtypes import parse_dtype
    from ..outputs import check_output_path, write_json
    from ..prompts import bundled_prompts, read_prompts
    from .plots import plot_diagnosis
    from .render import render_diagnosis
    from .session import diagnose_with_progress, make_console

    # Everything that can be refused is refused before the model loads.
    dtype = parse_dtype(args.dtype)
    _check_margin(args.margin)
    prompts = read_prompts(args.prompts) if args.prompts else bundled_prompts()
    json_path = check_output_path(args.json_path, "JSON") if args.json_path else None
    plot_path = check_output_path(args.plot, "plot") if args.plot else None

    max_memory = _check_layerwise(args)
    console = make_console()
    if args.layerwise:
        from .session import diagnose_layerwise_with_progress

        diagnosis = diagnose_layerwise_with_progress(args, console, prompts, dtype, max_memory)
    else:
        diagnosis = diagnose_with_progress(_load(args, console), prompts, dtype, args.margin, console)
    render_diagnosis(diagnosis, console)
    if json_path:
        write_json(diagnosis.to_json(), json_path)
        console.print(f"JSON written to {json_path}", highlight=False)
    if plot_path:
        plot_diagnosis(diagnosis, plot_path)
        console.print(f"plot written to {plot_path}", highlight=False)
    if args.fail_on_unsafe and not diagnosis.safe:
        return EXIT_UNSAFE
    return 0


def run_fix(args) -> int:
    from ..dtypes import parse_dtype
    from ..fixing.export import check_export_target, export_checkpoint, remove_stale_exports
    from ..fixing.workdirs import describe_removed
    from ..outputs import check_output_path, write_json
    from ..prompts import read_prompts
    from .render import render_fix
    from .session import fix_with_progress, make_console

    dtype = parse_dtype(args.dtype)
    _check_margin(args.margin)
    if args.max_kl is not None and not args.max_kl > 0:
        raise HalfsafeError(f"--max-kl {args.max_kl} must be a positive number")
    calibration = read_prompts(args.prompts) if args.prompts else None
    heldout = read_prompts(args.heldout) if args.heldout else None
    source = Path(args.model).expanduser() if Path(args.model).expanduser().exists() else None
    if args.strategy == "keep-fp32" and args.out:
        raise HalfsafeError(
            "--strategy keep-fp32 cannot be exported: it needs halfsafe's hooks at load time; drop --out to see "
            "its plan and cost, and use halfsafe.load_fixed(MODEL, strategy='keep-fp32') in Python"
        )
    if args.strategy == "rescale":
        if not args.out:
            raise HalfsafeError("--out DIR is required: where to write the fixed checkpoint")
        check_export_target(args.out, overwrite=args.overwrite, source=source)
    plan_path = check_output_path(args.plan_json, "plan JSON") if args.plan_json else None
    max_memory = _check_layerwise(args)
    if args.layerwise and args.strategy != "rescale":
        raise HalfsafeError("--layerwise writes a rescaled checkpoint; it does not combine with --strategy keep-fp32")
    removed = remove_stale_exports(args.out) if args.out else []
    if removed:
        print(f"halfsafe: {describe_removed(removed)}", file=sys.stderr)

    console = make_console()
    if args.layerwise:
        from safetensors import SafetensorError

        from .session import fix_layerwise_with_progress

        try:
            report = fix_layerwise_with_progress(args, console, dtype=dtype, calibration=calibration,
                                                 heldout=heldout, max_memory=max_memory)
        except KeyboardInterrupt:
            print("halfsafe: interrupted; nothing is at --out yet; rerun the same command to continue from the "
                  "last completed layer", file=sys.stderr)
            return 130
        except (OSError, SafetensorError) as exc:  # a full disk, found only while writing
            raise HalfsafeError(f"the layer-wise fix stopped: {str(exc).splitlines()[0]}; nothing is at --out; "
                                "remove the cause (a full disk, say) and rerun the same command to continue from the "
                                "last completed layer") from exc
        render_fix(report, console)
        console.print(f"fixed checkpoint written to {Path(args.out).expanduser().resolve()}", highlight=False)
        if plan_path:
            write_json(report.to_json(full_roles=True), plan_path)
        return 0
    loaded = _load(args, console)
    model, report = fix_with_progress(loaded, console, dtype=dtype, strategy=args.strategy, margin=args.margin,
                                      calibration=calibration, heldout=heldout, max_kl=args.max_kl,
                                      verify=not args.no_verify, for_export=bool(args.out),
                                      exact_only=args.exact_only, weights_format=loaded.weights_format)
    render_fix(report, console)
    if args.out:
        out = export_checkpoint(model, loaded.tokenizer, args.out, overwrite=args.overwrite,
                                weights_format=loaded.weights_format, scales=report.scales())
        console.print(f"fixed checkpoint written to {out}", highlight=False)
    if plan_path:
        write_json(report.to_json(full_roles=True), plan_path)
    return 0


def run_compare(args) -> int:
    from ..comparing import parse_variants
    from ..outputs import check_output_path, write_json
    from ..prompts import HELDOUT, bundled_prompts, read_prompts
    from .plots import plot_comparison
    from .render import render_comparison
    from .session import compare_with_progress, make_console

    names = parse_variants(args.variants)
    texts = read_prompts(args.texts) if args.texts else bundled_prompts(HELDOUT)
    if args.new_tokens < 0:
        raise HalfsafeError(f"--new-tokens {args.new_tokens} must be 0 or more")
    json_path = check_output_path(args.json_path, "JSON") if args.json_path else None
    plot_path = check_output_path(args.plot, "plot") if args.plot else None

    console = make_console()
    loaded = _load(args, console)
    results = compare_with_progress(loaded, console, texts, names, new_tokens=args.new_tokens,
                                                speed=not args.no_speed)
    title = f"{loaded.name}: {len(texts)} texts, {results[0].fidelity.positions} positions, reference fp32"
    render_comparison(results, console, title)
    if json_path:
        write_json({"schema_version": 1, "model": loaded.name, "texts": len(texts),
                    "variants": [r.to_json() for r in results]}, json_path)
        console.print(f"JSON written to {json_path}", highlight=False)
    if plot_path:
        plot_comparison(results, plot_path, title)
        console.print(f"plot written to {plot_path}", highlight=False)
    return 0


def run_generate(args) -> int:
    from ..outputs import check_output_path, write_json, write_json_lines
    from ..prompts import read_prompts
    from .generate import check_generation_args, generate_text
    from .render import render_generation
    from .session import load_for_generation, make_console

    if args.prompt is not None:
        prompts = [args.prompt]
    elif args.prompt_file:
        prompts = read_prompts(args.prompt_file)
    elif not sys.stdin.isatty():
        prompts = [sys.stdin.read().rstrip("\n")]
    else:
        prompts = []
    if not prompts or not any(p.strip() for p in prompts):
        raise HalfsafeError("no prompt: pass --prompt TEXT, --prompt-file FILE, or pipe the prompt on stdin")
    check_generation_args(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)
    to_stdout = args.json_path == "-"
    json_path = check_output_path(args.json_path, "JSON") if args.json_path and not to_stdout else None
    events_path = check_output_path(args.events, "events") if args.events else None

    console = make_console(stderr=True)
    loaded, notes = load_for_generation(args.model, console, dtype=args.dtype, device=args.device,
                                        device_map=args.device_map, allow_pickle=args.allow_pickle,
                                        trust_remote_code=args.trust_remote_code,
                                        attn_implementation=args.attn_implementation)

    def notify(line: str) -> None:
        console.print(f"advice: {line}", style="yellow", markup=False, highlight=False, soft_wrap=True)

    for line in notes:
        notify(line)
    streamer = None
    if len(prompts) == 1 and not to_stdout:
        from transformers import TextStreamer

        streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    result = generate_text(
        loaded.model, loaded.tokenizer, prompts, name=loaded.name, chat=args.chat, greedy=args.greedy,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
        max_new_tokens=args.max_new_tokens, seed=args.seed, on_nonfinite=args.on_nonfinite,
        stop_on_degeneration=args.stop_on_degeneration, streamer=streamer, notify=notify,
    )
    result.advice = notes + result.advice
    if streamer is None and not to_stdout:
        for prompt, text in zip(prompts, result.texts, strict=True):
            print(f"{prompt}{text}" if len(prompts) > 1 else text, flush=True)
    render_generation(result, console)
    if to_stdout:
        print(json.dumps(result.to_json(), ensure_ascii=False, indent=2))
    if json_path:
        write_json(result.to_json(), json_path)
    if events_path:
        write_json_lines([e.to_json() for e in result.report.events], events_path)
    return 0

