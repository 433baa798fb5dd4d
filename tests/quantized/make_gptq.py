"""Quantize a dense checkpoint with GPTQModel (real GPTQ, calibrated), saved in GPTQ format.

    .venv-gptq/bin/python tests/quantized/make_gptq.py SRC DST [--group-size 128] [--bits 4]

Symmetric int-`bits` weights in groups of `--group-size` input channels, no act-order
(`desc_act` False), `lm_head` kept dense, `checkpoint_format` gptq (v1: the stored zero point is
z - 1). Calibration: the prompts of halfsafe's calibration set, read here as plain JSON lines.
The tests' fixtures run it once per test run; it imports neither halfsafe nor the main env
(gptqmodel 7.6.0 pins numpy 2.2.6). Prints the time; GPTQModel writes each module's loss and the
damping it settled on to DST/quant_log.csv, and logs "Damp recovery failed" for a module it fell
back to plain rounding (RTN) for.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# GPTQModel runs its per-module work in a CPU thread pool sized by this; the machines are 2-core.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

CALIBRATION = Path(__file__).resolve().parents[2] / "src" / "halfsafe" / "data" / "calibration.jsonl"


def calibration_texts() -> list[str]:
    return [json.loads(line)["text"] for line in CALIBRATION.read_text(encoding="utf-8").splitlines() if line.strip()]


def quantize(src: str, dst: str, *, group_size: int, bits: int, dtype: str) -> None:
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    config = QuantizeConfig(bits=bits, group_size=group_size, desc_act=False, sym=True, format="gptq",
                            lm_head=False, offload_to_disk=False)
    # GPTQModel's default on a CPU is bfloat16; float32 keeps the dense tensors (embedding, norms) as
    # the source stores them, as the W4A16 fixtures do. The scales are float16 either way (GPTQ format).
    model = GPTQModel.load(src, config, device="cpu", dtype=getattr(torch, dtype))
    model.quantize(calibration_texts(), batch_size=1)
    model.save(dst)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    started = time.monotonic()
    quantize(args.src, args.dst, group_size=args.group_size, bits=args.bits, dtype=args.dtype)
    print(f"make_gptq: {args.src} -> {args.dst} in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
