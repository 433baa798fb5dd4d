"""The `halfsafe` command: a thin shell over the library.

Every bad input ends in one line on stderr and exit code 2, never a traceback, and nothing is
written; what can be checked (arguments, files, the output location, the tokenizer against the
model) is checked before the work starts. `diagnose --fail-on-unsafe` exits 3 on an unsafe
verdict.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from . import __version__
from .comparing import DEFAULT_VARIANTS
from .diagnosing import AT_RISK_MARGIN as DIAGNOSE_MARGIN
from .errors import HalfsafeError
from .planning import PLANNING_MARGIN as FIX_MARGIN

EXIT_UNSAFE = 3


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported in one line like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"halfsafe: error: {' '.join(message.split())}; see '{self.prog} --help'\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="halfsafe",
        description="Make LLM generation numerically safe in float16.",
        epilog="Exit codes: 0 done; 2 bad input (one line on stderr, nothing written); 3 unsafe verdict with "
        "diagnose --fail-on-unsafe; 4 fix's verification failed (nothing written); 5 non-finite logits under "
        "generate --on-nonfinite raise.",
    )
    parser.add_argument("--version", action="version", version=f"halfsafe {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    diagnose = commands.add_parser(
        "diagnose",
        help="where and by how much a model overflows a dtype",
        description="Run calibration prompts in fp32 with hooks, report per-layer headroom for the "
        "target dtype, then confirm by running the model in that dtype.",
    )
    _add_model_options(diagnose)
    _add_calibration_options(diagnose, DIAGNOSE_MARGIN, "flag sites within this factor of the dtype's maximum")
    diagnose.add_argument("--json", metavar="PATH", dest="json_path", help="write the diagnosis as JSON")
    diagnose.add_argument("--plot", metavar="PATH", help="write a PNG of per-layer max |activation|")
    diagnose.add_argument("--fail-on-unsafe", action="store_true", help="exit 3 when the verdict is unsafe")
    _add_layerwise_options(diagnose)

    fix = commands.add_parser(
        "fix",
        help="rescale weights so the model never overflows float16; export a standard checkpoint",
        description="Observe in fp32, choose power-of-two scales for the residual stream and MLP interiors, "
        "verify on held-out prompts against fp32 (gate: finite, mean KL at most bfloat16's), then write "
        "a Hugging Face checkpoint that plain transformers or vLLM loads in float16.",
    )
    fix.add_argument("--out", metavar="DIR", help="where to write the fixed checkpoint (required for rescale)")
    fix.add_argument("--strategy", default="rescale", choices=["rescale", "keep-fp32"],
                     help="rescale (default; exact, exported as a standard checkpoint) or keep-fp32 (any "
                     "architecture; keeps overflowing layers in fp32; in memory only, reports its cost)")
    _add_model_options(fix)
    _add_calibration_options(fix, FIX_MARGIN, "keep every scaled site this factor below the dtype's maximum")
    fix.add_argument("--heldout", metavar="FILE",
                     help="verification prompts (default: the bundled held-out set); one longer than the model's "
                     "positions, less the 32 tokens generated after it, is truncated, with a notice")
    fix.add_argument("--max-kl", type=float, help="gate on this mean KL instead of bfloat16's")
    fix.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    fix.add_argument("--plan-json", metavar="PATH", help="also write the plan and verification numbers as JSON")
    fix.add_argument("--no-verify", action="store_true",
                     help="skip the verification gate (the plan still keeps every site --margin below the limit)")
    _add_layerwise_options(fix)

    compare = commands.add_parser(
        "compare",
        help="fidelity and speed of fp32, bf16, fp16, fixed fp16 (and more) against fp32",
        description="Per variant: non-finite share; KL(fp32 || variant) mean, p99, max; top-1 agreement; "
        "mean |delta p|; perplexity; greedy-match length; greedy tokens/s at batch 1 and 8; weight memory.",
    )
    _add_model_options(compare)
    compare.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                         help="comma-separated: fp32, bf16, fp16, fp16-fixed, fp16-clamp, fixed:DIR")
    compare.add_argument("--texts", metavar="FILE",
                         help="evaluation texts (default: the bundled held-out set); one longer than the model's "
                         "positions, less --new-tokens, is truncated, with a notice")
    compare.add_argument("--new-tokens", type=int, default=32, help="greedy tokens compared with fp32 (default 32)")
    compare.add_argument("--no-speed", action="store_true", help="skip the tokens/s measurements")
    compare.add_argument("--json", metavar="PATH", dest="json_path", help="write the results as JSON")
    compare.add_argument("--plot", metavar="PATH", help="write a PNG of the per-position KL distributions")

    generate = commands.add_parser(
        "generate",
        help="guarded generation: non-finite steps recovered in fp32, degeneration reported",
        description="Generate from a prompt with transformers' own generate, guarded: a step whose logits are "
        "non-finite is recomputed in float32 (or sanitized, or raises), loops and token-0 floods are reported. "
        "Text streams to stdout; advice and the report go to stderr.",
    )
    _add_model_options(generate)
    source = generate.add_mutually_exclusive_group()
    source.add_argument("--prompt", metavar="TEXT",
                        help="the prompt (default: read from stdin); one longer than the model's positions is refused")
    source.add_argument("--prompt-file", metavar="FILE",
                        help="prompts, one per line or JSONL with 'text'; one batch; the same limit")
    generate.add_argument("--dtype", default="auto",
                          help="auto (by hardware: bfloat16 on compute capability >= 8.0, float16 with the fix below "
                          "it, float32 on CPU), float16, bfloat16 or float32")
    generate.add_argument("--max-new-tokens", type=int, default=64,
                          help="default 64; shortened, with a notice, to the model's positions left after the prompt")
    generate.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    generate.add_argument("--temperature", type=float, help="sampling temperature (default: the model's)")
    generate.add_argument("--top-p", type=float, help="nucleus sampling mass (default: the model's)")
    generate.add_argument("--top-k", type=int, help="top-k sampling (default: the model's)")
    generate.add_argument("--repetition-penalty", type=float, help="e.g. 1.1 (default: the model's)")
    generate.add_argument("--seed", type=int, help="random seed for sampling")
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    generate.add_argument("--on-nonfinite", default="recover", choices=["recover", "sanitize", "raise"],
                          help="recover (default): recompute the step in float32; sanitize: mask NaN/inf, stop a row "
                          "with nothing left; raise: stop with an error (exit 5)")
    generate.add_argument("--stop-on-degeneration", action="store_true",
                          help="end a row that repeats one token, loops or floods token 0")
    generate.add_argument("--json", metavar="PATH", dest="json_path",
                          help="write the result as JSON (text, tokens, events, recovered_steps, dtype, seconds); "
                          "'-' for stdout")
    generate.add_argument("--events", metavar="FILE", help="write the guard's events as JSON lines")

    demo = commands.add_parser(
        "demo",
        help="the float16 failure, its diagnosis and its fix on gemma-3-270m (from PyPI, cached locally)",
    )
    demo.add_argument("--plot", metavar="PATH", help="where to write the plot (default: in the halfsafe cache)")
    demo.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    return parser


def _add_layerwise_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layerwise", action="store_true",
                        help="read the checkpoint one decoder layer at a time: memory is one layer in fp32 plus the "
                        "prompts' hidden states (for models larger than memory; safetensors directories only)")
    parser.add_argument("--max-memory", metavar="SIZE",
                        help="with --layerwise: refuse a model whose largest unit exceeds SIZE in fp32 (e.g. 8GB)")


def _add_calibration_options(parser: argparse.ArgumentParser, margin: float, margin_help: str) -> None:
    parser.add_argument("--dtype", default="float16", help="target dtype (default float16)")
    parser.add_argument("--prompts", metavar="FILE",
                        help="calibration prompts: text, one per line, or JSONL with 'text' (default: the bundled "
                        "set); one longer than the model's positions is truncated to fit, with a notice")
    parser.add_argument("--margin", type=float, default=margin, help=f"{margin_help} (default {margin:g})")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="local HF directory, hub id, .gguf file, or 'demo'")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow pickle .bin weights (they can run code when loaded)")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the checkpoint's own modelling code")
    parser.add_argument("--attn-implementation", choices=["eager", "sdpa"],
                        help="attention kernel to load the model with (default: transformers' choice)")
    parser.add_argument("--device-map", metavar="MAP",
                        help="accelerate device map for the in-memory path (auto, balanced, sequential, cpu): spread "
                        "a model over several GPUs or offload to CPU; replaces --device")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "diagnose":
            return run_diagnose(args)
        if args.command == "fix":
            return run_fix(args)
        if args.command == "compare":
            return run_compare(args)
        if args.command == "generate":
            return run_generate(args)
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(plot=args.plot, device=args.device)
    except HalfsafeError as exc:
        print(f"halfsafe: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("halfsafe: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("halfsafe: error: out of memory; use a machine with more memory or a smaller model", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if "out of memory" not in str(exc).lower():
            raise
        print(f"halfsafe: error: out of memory on the device ({str(exc).splitlines()[0][:120]}); "
              "try --device cpu or a smaller model", file=sys.stderr)
        return 2
    return 2


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
    from .layerwise_fix import parse_memory

    return parse_memory(args.max_memory) if args.max_memory else None


def run_diagnose(args) -> int:
    from .dtypes import parse_dtype
    from .prompts import bundled_prompts, read_prompts
    from .reporting import check_output_path, plot_diagnosis, render_diagnosis, write_json
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
    from .dtypes import parse_dtype
    from .exporting import check_export_target, export_checkpoint, remove_stale_exports
    from .prompts import read_prompts
    from .reporting import check_output_path, render_fix, write_json
    from .session import fix_with_progress, make_console
    from .workdirs import describe_removed

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
            write_json(report.to_json(), plan_path)
        return 0
    loaded = _load(args, console)
    model, report = fix_with_progress(loaded, console, dtype=dtype, strategy=args.strategy, margin=args.margin,
                                      calibration=calibration, heldout=heldout, max_kl=args.max_kl,
                                      verify=not args.no_verify, for_export=bool(args.out))
    render_fix(report, console)
    if args.out:
        out = export_checkpoint(model, loaded.tokenizer, args.out, overwrite=args.overwrite)
        console.print(f"fixed checkpoint written to {out}", highlight=False)
    if plan_path:
        write_json(report.to_json(), plan_path)
    return 0


def run_compare(args) -> int:
    from .comparing import parse_variants
    from .prompts import HELDOUT, bundled_prompts, read_prompts
    from .reporting import check_output_path, plot_comparison, render_comparison, write_json
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
    from .generating import check_generation_args, generate_text
    from .prompts import read_prompts
    from .reporting import check_output_path, render_generation, write_json, write_json_lines
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
                                        device_map=args.device_map, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
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
        for prompt, text in zip(prompts, result.texts):
            print(f"{prompt}{text}" if len(prompts) > 1 else text, flush=True)
    render_generation(result, console)
    if to_stdout:
        print(json.dumps(result.to_json(), ensure_ascii=False, indent=2))
    if json_path:
        write_json(result.to_json(), json_path)
    if events_path:
        write_json_lines([e.to_json() for e in result.report.events], events_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
