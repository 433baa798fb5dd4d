"""Layer-wise fix and diagnose: peak memory flat and time linear in depth.

Writes random checkpoints to disk one layer at a time (bfloat16, as models are published), from
Qwen3 configs: 8, 16 and 32 layers of the Qwen3-1.7B layer shape, then an 8B-shaped model (32
layers, hidden 4096). Runs `halfsafe fix --layerwise` (and `diagnose --layerwise` on the 8B
shape) as a user would, each in its own process, and reads that process's peak resident memory
from the kernel (ru_maxrss of the finished child; this driver imports no torch, so the child
starts small). Random weights do not overflow: the plan is the identity, and every step of the
job (observe, plan, scale, cast, write) still runs on every tensor.

Target on a 2-core, 24 GiB machine: the 8B shape diagnosed and fixed under 8 GB peak RSS.

Run: python benchmarks/bench_layerwise.py [--depths 8,16,32] [--skip-8b] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {  # Qwen3Config fields of the public configs
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, vocab_size=151936, tie_word_embeddings=False),
}

_WRITE = """
import json, sys, torch
from pathlib import Path
from accelerate import init_empty_weights
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, Qwen3Config
from halfsafe.testing import byte_tokenizer
out, layers, shape = Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
config = Qwen3Config(**shape, num_hidden_layers=layers, max_position_embeddings=4096, bos_token_id=1,
                     eos_token_id=2, pad_token_id=0)
with init_empty_weights():
    model = AutoModelForCausalLM.from_config(config)
model.tie_weights()
names = {}
for name, param in model.named_parameters():  # tied weights are listed once
    unit = name.split(".")[2] if name.startswith("model.layers.") else "outer"
    names.setdefault(unit, []).append((name, tuple(param.shape)))
out.mkdir(parents=True)
generator = torch.Generator().manual_seed(0)
weight_map = {}
for k, (unit, entries) in enumerate(names.items()):
    tensors = {}
    for name, shape in entries:
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
    shard = f"model-{k + 1:05d}-of-{len(names):05d}.safetensors"
    save_file(tensors, str(out / shard), metadata={"format": "pt"})
    weight_map.update({name: shard for name in tensors})
    del tensors
(out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
config.dtype = torch.bfloat16
config.save_pretrained(str(out))
byte_tokenizer().save_pretrained(str(out))
print(sum(p.numel() for p in model.parameters()))
"""


def run(command: list[str]) -> tuple[float, int, str]:
    """(seconds, peak RSS bytes, stdout) of a child process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command[:4])} failed:\n{output[-3000:]}")
    return seconds, usage.ru_maxrss * 1024, output


def machine() -> str:
    sys.path.insert(0, str(Path(__file__).parent))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    total = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return f"{cpu}, {os.cpu_count()} cores, {total / 2**20:.0f} GiB; Python {sys.version.split()[0]}"


def main() -> None:
    import json

    parser = argparse.ArgumentParser()
    parser.add_argument("--depths", default="8,16,32", help="layer counts of the Qwen3-1.7B shape")
    parser.add_argument("--skip-8b", action="store_true")
    parser.add_argument("--workdir", help="where the checkpoints go (default: a temporary directory; ~20 GB)")
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="halfsafe-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    versions = subprocess.run([sys.executable, "-c", "import torch, transformers; print(torch.__version__, "
                               "transformers.__version__)"], capture_output=True, text=True).stdout.split()
    print(f"machine: {machine()}, torch {versions[0]}, transformers {versions[1]}")
    print("job: halfsafe fix MODEL --layerwise --no-verify --device cpu (37 bundled calibration prompts)\n")
    print("| shape | layers | fp32 weights | write checkpoint | fix time | time per layer | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    jobs = [("qwen3-1.7b", int(d)) for d in args.depths.split(",")] + ([] if args.skip_8b else [("qwen3-8b", 32)])
    for shape, layers in jobs:
        source, out = root / f"{shape}-{layers}", root / f"{shape}-{layers}-fixed"
        shutil.rmtree(source, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        written, _, text = run([sys.executable, "-c", _WRITE, str(source), str(layers), json.dumps(SHAPES[shape])])
        params = int(text.strip().splitlines()[-1])
        seconds, peak, _ = run([sys.executable, "-m", "halfsafe", "fix", str(source), "--layerwise", "--no-verify",
                                "--device", "cpu", "--out", str(out)])
        print(f"| {shape} | {layers} | {params * 4 / 1e9:.1f} GB | {written:.0f} s | {seconds:.0f} s | "
              f"{seconds / layers:.1f} s | {peak / 1e9:.2f} GB |", flush=True)
        if shape == "qwen3-8b":
            prompts = root / "prompts.txt"
            prompts.write_text("The capital of France is\n上海有个非常出名的地方，\ndef add(a, b):\n1 + 1 =\n",
                               encoding="utf-8")
            seconds, peak, _ = run([sys.executable, "-m", "halfsafe", "diagnose", str(source), "--layerwise",
                                    "--device", "cpu", "--prompts", str(prompts)])
            print(f"| {shape} diagnose (4 prompts; fp32 observation, float16 and bfloat16 confirmation) | {layers} | "
                  f"{params * 4 / 1e9:.1f} GB | | {seconds:.0f} s | {seconds / layers:.1f} s | {peak / 1e9:.2f} GB |",
                  flush=True)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(source, ignore_errors=True)
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
