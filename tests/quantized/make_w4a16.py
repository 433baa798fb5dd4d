"""Quantize a dense checkpoint to W4A16 with the real llm-compressor; run in .venv-llmc.

    .venv-llmc/bin/python tests/quantized/make_w4a16.py SRC DST [--group-size 128] [--dtype float32]
                                                        [--scheme W4A16|W8A16|W8A8]

RTN (no calibration data): `QuantizationModifier`, symmetric int4 weights per group, activations
left in the model's dtype, `lm_head` kept dense, written pack-quantized (compressed-tensors).
`--scheme W8A16`: symmetric int8 weights, one scale per output channel (the channel strategy),
pack-quantized. `--scheme W8A8` (int8 weights per channel, int8 activations quantized
per token at run time) is a real checkpoint with activation quantization, which halfsafe refuses to write. The tests'
fixtures run it once per test run; it imports neither halfsafe nor the main env (llmcompressor
0.14 pins transformers 5.17, beside the main env's 5.24).
"""

from __future__ import annotations

import argparse
import time

import torch


def quantize(src: str, dst: str, *, group_size: int, dtype: str, scheme: str) -> None:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype))
    tokenizer = AutoTokenizer.from_pretrained(src)
    if scheme == "W8A16":  # int8, one scale per output channel: the channel strategy
        weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
        scheme = QuantizationScheme(targets=["Linear"], weights=weights)
        recipe = QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    elif scheme != "W4A16":
        recipe = QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"])
    elif group_size == 128:
        recipe = QuantizationModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    else:  # a tiny model's 64-wide layers have no group of 128: the W4A16 preset with a smaller group
        weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)
        scheme = QuantizationScheme(targets=["Linear"], weights=weights)
        recipe = QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    oneshot(model=model, recipe=recipe)
    model.save_pretrained(dst, save_compressed=True)
    tokenizer.save_pretrained(dst)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--scheme", default="W4A16", choices=["W4A16", "W8A16", "W8A8"])
    args = parser.parse_args()
    started = time.monotonic()
    quantize(args.src, args.dst, group_size=args.group_size, dtype=args.dtype, scheme=args.scheme)
    print(f"make_w4a16: {args.src} -> {args.dst} in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
