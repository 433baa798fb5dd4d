"""Write a dense checkpoint's Linear layers as an AWQ-GEMM checkpoint with vLLM's own AWQ
packer; run in .venv-vllm.

    .venv-vllm/bin/python tests/quantized/make_awq.py SRC DST [--group-size 128]

AWQ's calibration (activation-aware per-channel scales searched on data) has no CPU path on this
project's machines: GPTQModel's AWQ asks for CUDA, its torch backend fails on Gemma 3's rotary
signature, AutoAWQ does not know gemma3_text. What this writes is the AWQ-GEMM layout itself,
with the int4 values of round-to-nearest asymmetric quantization per group of input channels
(vLLM's `quantize_weights`, uint4 with zero points, AWQ's convention) packed by vLLM's
`awq_pack` (the interleaved order vLLM's and AutoAWQ's GEMM kernels unpack), scales and the
rest of the model in float16, `lm_head` dense: the tensors and config.json an AWQ GEMM
checkpoint carries, read by vLLM's `awq` method. It imports neither halfsafe nor the main env.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch


def quantize(src: Path, dst: Path, *, group_size: int) -> int:
    from safetensors.torch import load_file, save_file
    from vllm.model_executor.layers.quantization.utils.quant_utils import awq_pack, quantize_weights
    from vllm.scalar_type import scalar_types

    config = json.loads((src / "config.json").read_text())
    dense = {}
    for shard in sorted(src.glob("*.safetensors")):
        dense.update(load_file(str(shard)))
    tensors, count = {}, 0
    for name, tensor in dense.items():
        module, _, leaf = name.rpartition(".")
        # The decoder's Linear layers: every 2-D `*_proj.weight` inside the layers (lm_head and
        # the embedding stay dense, as AWQ leaves them).
        if leaf == "weight" and tensor.dim() == 2 and module.rpartition(".")[2].endswith("_proj") \
                and ".layers." in module:
            w = tensor.to(torch.float32).t().contiguous()  # [in, out]: AWQ's orientation
            size_k, size_n = w.shape
            _, q, scales, zeros = quantize_weights(w, scalar_types.uint4, group_size, zero_points=True)
            tensors[f"{module}.qweight"] = awq_pack(q, 4, size_k, size_n)
            tensors[f"{module}.qzeros"] = awq_pack(zeros, 4, size_k // group_size, size_n)
            tensors[f"{module}.scales"] = scales.to(torch.float16).contiguous()
            count += 1
        else:
            tensors[name] = tensor.to(torch.float16) if tensor.is_floating_point() else tensor
    dst.mkdir(parents=True)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config["dtype"] = "float16"
    config.pop("torch_dtype", None)
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size,
                                     "zero_point": True, "version": "gemm", "modules_to_not_convert": None}
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for path in src.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name not in ("config.json", "README.md") \
                and not path.name.endswith(".index.json"):
            shutil.copyfile(path, dst / path.name)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args()
    started = time.monotonic()
    count = quantize(args.src, args.dst, group_size=args.group_size)
    print(f"make_awq: {args.src} -> {args.dst}, {count} Linear layers AWQ-GEMM in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
