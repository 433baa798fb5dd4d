"""Quantize a dense checkpoint with bitsandbytes 4-bit, as a QLoRA user does, and save it.

    python tests/quantized/make_bnb.py SRC DST [--quant-type nf4|fp4] [--double-quant]

transformers' `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=float16)`, the rest
of the model loaded in float16 (so each quant state dequantizes to float16), then
`save_pretrained`: the pre-quantized checkpoint a user downloads from the Hub. It runs in the
main environment (bitsandbytes 0.50 quantizes on a CPU) without halfsafe on the path, once per
test run.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def quantize(src: str, dst: str, *, quant_type: str, double_quant: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                bnb_4bit_compute_dtype=torch.float16, bnb_4bit_use_double_quant=double_quant)
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=config, dtype=torch.float16)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--quant-type", default="nf4", choices=("nf4", "fp4"))
    parser.add_argument("--double-quant", action="store_true")
    args = parser.parse_args()
    start = time.time()
    quantize(args.src, args.dst, quant_type=args.quant_type, double_quant=args.double_quant)
    print(f"quantized {args.src} -> {args.dst} in {time.time() - start:.1f} s")
    assert not any(name.startswith("halfsafe") for name in sys.modules)
