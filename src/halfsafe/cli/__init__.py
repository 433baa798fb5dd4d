"""The `halfsafe` command: a thin shell over the library.

Every bad input ends in one line on stderr and exit code 2, never a traceback, and nothing is
written; what can be checked (arguments, files, the output location, the tokenizer against the
model) is checked before the work starts. `diagnose --fail-on-unsafe` exits 3 on an unsafe
verdict.
"""

from __future__ import annotations

import sys

from ..errors import HalfsafeError
from ..model.overrides import extra_overrides, read_overrides
from .commands import EXIT_UNSAFE, run_compare, run_diagnose, run_fix, run_generate
from .parser import build_parser

__all__ = ["EXIT_UNSAFE", "build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        table = read_overrides(args.overrides) if getattr(args, "overrides", None) else {}
        with extra_overrides(table):
            return _run(args)
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


def _run(args) -> int:
    if args.command == "diagnose":
        return run_diagnose(args)
    if args.command == "fix":
        return run_fix(args)
    if args.command == "compare":
        return run_compare(args)
    if args.command == "generate":
        return run_generate(args)
    from .demo import run_demo

    return run_demo(plot=args.plot, device=args.device)
