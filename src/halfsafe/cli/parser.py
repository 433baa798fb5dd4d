"""The `halfsafe` command's arguments: one parser, its subcommands and their shared options."""

from __future__ import annotations

import argparse

from .. import __version__
from ..comparing import DEFAULT_VARIANTS
from ..diagnosing import AT_RISK_MARGIN as DIAGNOSE_MARGIN
from ..fixing.plan import PLANNING_MARGIN as FIX_MARGIN


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
    fix.add_argument("--exact-only", action="store_true",
                     help="refuse to export a model whose checkpoint cannot be bit-exact in fp32 (by default such "
                          "a model is exported bounded: one eps per config field, its fp32 delta measured, bounded "
                          "and recorded as exact: false)")
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
    parser.add_argument("--overrides", metavar="FILE",
                        help='what halfsafe cannot derive for this model, as JSON: {"ModelClass": {"why": "...", '
                        '"layers": "model.layers"}} names the decoder-layer stack (see data/overrides.json)')
    parser.add_argument("--attn-implementation", choices=["eager", "sdpa"],
                        help="attention kernel to load the model with (default: transformers' choice)")
    parser.add_argument("--device-map", metavar="MAP",
                        help="accelerate device map for the in-memory path (auto, balanced, sequential, cpu): spread "
                        "a model over several GPUs or offload to CPU; replaces --device")
