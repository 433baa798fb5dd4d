"""Layer-wise fix and diagnose: peak memory flat and time linear in depth.

Writes random checkpoints to disk one layer at a time (bfloat16, as models are published), from
Qwen3 configs: 8, 16 and 32 layers of the Qwen3-1.7B layer shape, then an 8B-shaped model (32
layers, hidden 4096), then a Llama-3-70B-shaped one (hidden 8192, intermediate 28672, 64/8 heads,
untied 128,256 vocabulary; 8 of its 80 layers by default, 18 GB in bfloat16). Runs `halfsafe fix
--layerwise` (and `diagnose --layerwise` on the 8B shape) as a user would, each in its own
process, and reads that process's peak resident memory from the kernel (ru_maxrss of the
finished child; this driver imports no torch, so the child starts small). Random weights do not
overflow: on the Qwen3 shapes the plan is the identity, and every step of the job (observe,
plan, scale, cast, write) still runs on every tensor. The 70B shape has a massive activation
planted as tests/support/models.py plants it (a layer-1 MLP neuron that fires on BOS only writes
1e5 into one residual channel), so its plan really rescales; its run is timed per layer (the
child marks each step of its progress bar) and its resident memory sampled per step, and the
80-layer time is projected as the fixed part plus 80 times a layer.

The disk each checkpoint needs (its bfloat16 source and the float16 output) is checked before it
is written, and a shortfall refused in one line.

Targets on a 2-core, 24 GiB machine: the 8B shape diagnosed and fixed under 8 GB peak RSS; the
70B shape fixed under 12 GB.

Run: python benchmarks/bench_layerwise.py [--depths 8,16,32] [--skip-8b] [--llama-layers 8 (0: skip)]
     [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from itertools import pairwise
from pathlib import Path

SHAPES = {  # config fields of the public configs
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, vocab_size=151936, tie_word_embeddings=False),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                       head_dim=128, vocab_size=128256, tie_word_embeddings=False, rms_norm_eps=1e-5,
                       rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
}
CONFIGS = {"qwen3-1.7b": "Qwen3Config", "qwen3-8b": "Qwen3Config", "llama3-70b": "LlamaConfig"}
PLANTED = {"llama3-70b"}  # shapes given a massive activation (the plan rescales)
LLAMA_70B_LAYERS = 80
SLACK = 2 * 10**9  # beyond the two checkpoints: tokenizer, resume state, what others write meanwhile


def parameters(shape: dict, layers: int) -> int:
    """Parameters of a Qwen3 / Llama checkpoint of `shape` (as the writer makes it)."""
    hidden, heads, kv, head_dim = (shape[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                                      "head_dim"))
    layer = hidden * head_dim * (2 * heads + 2 * kv) + 3 * hidden * shape["intermediate_size"] + 2 * hidden
    if "rope_parameters" not in shape:  # Qwen3's q and k norms
        layer += 2 * head_dim
    outer = shape["vocab_size"] * hidden * (1 if shape["tie_word_embeddings"] else 2) + hidden
    return outer + layers * layer


def check_disk(root: Path, shape: str, layers: int) -> None:
    """Refuse, in one line and before anything is written, a checkpoint the disk cannot take."""
    per_layer = parameters(SHAPES[shape], 1) - parameters(SHAPES[shape], 0)
    need = 4 * parameters(SHAPES[shape], layers) + SLACK  # bfloat16 source + float16 output
    free = shutil.disk_usage(root).free
    if need > free:
        fits = max(0, (free - SLACK - 4 * parameters(SHAPES[shape], 0)) // (4 * per_layer))
        raise SystemExit(f"bench_layerwise: {shape} with {layers} layers needs {need / 1e9:.1f} GB free in {root} "
                         f"(its bfloat16 checkpoint, the float16 fix and {SLACK / 1e9:.0f} GB slack), "
                         f"{free / 1e9:.1f} GB is free; free some space, pass --workdir on a larger disk, or run "
                         f"fewer layers ({fits} fit)")

_WRITE = """
import json, sys, torch
import transformers
from pathlib import Path
sys.path.insert(0, sys.argv[6])  # the checkout: tests/support
from accelerate import init_empty_weights
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from tests.support.models import BOS, CHANNEL, MASSIVE, PLANT_LAYER, byte_tokenizer
out, layers, shape, config_class, plant = (Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]),
                                            sys.argv[4], sys.argv[5] == "plant")
config = getattr(transformers, config_class)(**shape, num_hidden_layers=layers, max_position_embeddings=4096,
                                             bos_token_id=1, eos_token_id=2, pad_token_id=0)
with init_empty_weights():
    model = AutoModelForCausalLM.from_config(config)
model.tie_weights()
units = {}  # one shard per layer; outside the layers one per tensor (an embedding takes gigabytes)
for name, param in model.named_parameters():  # tied weights are listed once
    unit = int(name.split(".")[2]) if name.startswith("model.layers.") else name
    units.setdefault(unit, []).append((name, tuple(param.shape)))
order = ["model.embed_tokens.weight"] + [u for u in units if isinstance(u, int)] + [
    u for u in units if isinstance(u, str) and u != "model.embed_tokens.weight"]
out.mkdir(parents=True)
generator = torch.Generator().manual_seed(0)
weight_map = {}
# The planted massive activation, as tests/support/models.py plants it: an embedding channel only BOS uses
# (DETECTOR) drives MLP neuron 0 of layer PLANT_LAYER, whose down_proj column writes MASSIVE into
# residual channel CHANNEL at BOS and nothing elsewhere. No earlier writer touches DETECTOR. The
# neuron's input is computed here from BOS alone (at position 0 attention is its own value).
hidden_size, eps = config.hidden_size, config.rms_norm_eps
DETECTOR, bos = hidden_size - 1, None
group = config.num_attention_heads // config.num_key_value_heads


def norm(x):
    return x * torch.rsqrt(x.pow(2).mean() + eps)


def attention_out(t, prefix, x):  # the attention's output at BOS (position 0): o_proj(v), unit norms
    v = t[prefix + "self_attn.v_proj.weight"].float() @ norm(x)
    v = v.view(config.num_key_value_heads, -1).repeat_interleave(group, dim=0).flatten()
    return t[prefix + "self_attn.o_proj.weight"].float() @ v


def mlp_out(t, prefix, x):
    m = norm(x)
    gate, up = t[prefix + "mlp.gate_proj.weight"].float() @ m, t[prefix + "mlp.up_proj.weight"].float() @ m
    return t[prefix + "mlp.down_proj.weight"].float() @ (torch.nn.functional.silu(gate) * up)


def planted(unit, t):
    global bos
    if unit == "model.embed_tokens.weight":
        e = t[unit]
        e[:, DETECTOR] = 0.0
        e[BOS, DETECTOR] = 1000.0  # far above the row's other entries: the neuron's input is large
        bos = e[BOS].float()
    elif isinstance(unit, int) and unit <= PLANT_LAYER:
        prefix = f"model.layers.{unit}."
        t[prefix + "self_attn.o_proj.weight"][DETECTOR] = 0.0
        bos = bos + attention_out(t, prefix, bos)
        if unit < PLANT_LAYER:
            t[prefix + "mlp.down_proj.weight"][DETECTOR] = 0.0
            bos = bos + mlp_out(t, prefix, bos)
        else:
            for proj in ("gate_proj", "up_proj"):
                w = t[prefix + f"mlp.{proj}.weight"]
                w[0] = 0.0
                w[0, DETECTOR] = 1.0
            x = norm(bos)[DETECTOR]
            down = t[prefix + "mlp.down_proj.weight"]
            down[CHANNEL] = 0.0
            down[:, 0] = 0.0
            down[CHANNEL, 0] = MASSIVE / float(torch.nn.functional.silu(x) * x)
            print("planted", float(x), float(down[CHANNEL, 0]), file=sys.stderr)


for k, unit in enumerate(order):
    tensors = {}
    for name, shape in units[unit]:
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
    if plant:
        planted(unit, tensors)
    shard = f"model-{k + 1:05d}-of-{len(order):05d}.safetensors"
    save_file(tensors, str(out / shard), metadata={"format": "pt"})
    weight_map.update({name: shard for name in tensors})
    del tensors
(out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
config.dtype = torch.bfloat16
config.save_pretrained(str(out))
byte_tokenizer().save_pretrained(str(out))
print(sum(p.numel() for p in model.parameters()))
"""

# `halfsafe fix` as the command line runs it, with a timestamp (time.time()) at every step of its
# progress bar: `fix --layerwise --no-verify` steps once per observed layer, once when the units
# outside the layers are written, then once per written layer.
_TIMED = """
import json, sys, time
from contextlib import contextmanager
import halfsafe.cli.session as session
original, marks = session.progress_bar, []


@contextmanager
def timed(console, description, total):
    with original(console, description, total) as advance:
        yield lambda: (marks.append(time.time()), advance())


session.progress_bar = timed
from halfsafe.cli import main
code = main(sys.argv[1:])
print("marks " + json.dumps(marks))
sys.exit(code)
"""


def run(command: list[str], samples: list | None = None) -> tuple[float, int, str]:
    """(seconds, peak RSS bytes, stdout) of a child process; with `samples`, its resident memory
    (time.time(), bytes) every 0.2 s is appended there too."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = threading.Event()

    def sample():
        while not done.wait(0.2):
            try:
                status = open(f"/proc/{process.pid}/status").read()
            except OSError:
                return
            rss = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS")), None)
            if rss is not None:
                samples.append((time.time(), rss))

    sampler = threading.Thread(target=sample, daemon=True) if samples is not None else None
    if sampler is not None:
        sampler.start()
    output = process.stdout.read()
    done.set()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command[:4])} failed:\n{output[-3000:]}")
    return seconds, usage.ru_maxrss * 1024, output


def phases(started: float, marks: list[float], samples: list, layers: int) -> dict:
    """Per-layer observe and export time, the fixed part, and peak sampled RSS per phase."""
    observe = [b - a for a, b in pairwise(marks[:layers])]
    export = [b - a for a, b in pairwise(marks[layers:2 * layers + 1])]
    per_layer = sorted(observe)[len(observe) // 2] + sorted(export)[len(export) // 2]

    def peak(a, b):
        return max((rss for t, rss in samples if a <= t <= b), default=0)

    bounds = [started] + marks
    return dict(
        per_layer=per_layer, observe=observe, export=export,
        first=marks[0] - started,  # start, roles, input embedding, layer 0
        outer=marks[layers] - marks[layers - 1],  # output embedding (tail), plan, units outside the layers written
        rss_first=peak(bounds[0], bounds[1]), rss_layers=max(peak(bounds[i], bounds[i + 1]) for i in range(1, layers)),
        rss_outer=peak(marks[layers - 1], marks[layers]),
        rss_export=max(peak(marks[i], marks[i + 1]) for i in range(layers, 2 * layers)),
    )


def machine() -> str:
    sys.path.insert(0, str(Path(__file__).parent))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    total = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return f"{cpu}, {os.cpu_count()} cores, {total / 2**20:.0f} GiB; Python {sys.version.split()[0]}"


def fix_70b(source: Path, out: Path, layers: int, params: int, written: float) -> None:
    """The 70B shape: the plan line, timing per layer, memory per phase, the 80-layer projection."""
    samples: list = []
    started = time.time()
    seconds, peak, output = run([sys.executable, "-c", _TIMED, "fix", str(source), "--layerwise", "--no-verify",
                                 "--device", "cpu", "--out", str(out)], samples)
    marks = json.loads(next(line for line in output.splitlines() if line.startswith("marks "))[6:])
    p = phases(started, marks, samples, layers)
    fixed = seconds - layers * p["per_layer"]
    print(f"| llama3-70b shape, planted (hidden 8,192, untied 128,256 vocabulary) | {layers} | "
          f"{params * 4 / 1e9:.1f} GB | {written:.0f} s | {seconds:.0f} s | {p['per_layer']:.1f} s | "
          f"{peak / 1e9:.2f} GB |", flush=True)
    print()
    for line in output.splitlines():
        if line.startswith(("layer-wise:", "plan (", "(", "roles derived", "config rms", "fixed checkpoint")):
            print("  " + line)
    print(f"  per layer: observe {', '.join(f'{t:.0f}' for t in p['observe'])} s; "
          f"export {', '.join(f'{t:.0f}' for t in p['export'])} s (medians summed: {p['per_layer']:.1f} s)")
    print(f"  fixed part: {fixed:.0f} s (start to the first layer observed: {p['first']:.0f} s, which includes "
          f"layer 0; output embedding, plan and units outside the layers written: {p['outer']:.0f} s)")
    print(f"  sampled peak RSS: start + input embedding + layer 0 {p['rss_first'] / 1e9:.2f} GB; observing layers "
          f"1-{layers - 1} {p['rss_layers'] / 1e9:.2f} GB; output embedding + outer export "
          f"{p['rss_outer'] / 1e9:.2f} GB; layer export {p['rss_export'] / 1e9:.2f} GB")
    full = fixed + LLAMA_70B_LAYERS * p["per_layer"]
    print(f"  projected for {LLAMA_70B_LAYERS} layers ({parameters(SHAPES['llama3-70b'], LLAMA_70B_LAYERS) / 1e9:.1f}"
          f" B parameters): {full:.0f} s ({full / 3600:.1f} h), peak RSS {peak / 1e9:.2f} GB (flat: the largest "
          "unit is outside the layers, and no unit grows with depth)\n", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--depths", default="8,16,32", help="layer counts of the Qwen3-1.7B shape ('' for none)")
    parser.add_argument("--skip-8b", action="store_true")
    parser.add_argument("--llama-layers", type=int, default=8,
                        help="layers of the Llama-3-70B shape (0: skip; 8 take 17.9 GB in bfloat16, 36 GB fixed too)")
    parser.add_argument("--workdir", help="where the checkpoints go (default: a temporary directory; 40 GB at most "
                                          "at once with the 70B shape)")
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="halfsafe-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    jobs = [("qwen3-1.7b", int(d)) for d in args.depths.split(",") if d.strip()]
    jobs += [] if args.skip_8b else [("qwen3-8b", 32)]
    jobs += [("llama3-70b", args.llama_layers)] if args.llama_layers > 0 else []
    try:
        for shape, layers in jobs:  # each before any work (one at a time on disk), and again before it is written
            check_disk(root, shape, layers)
        versions = subprocess.run([sys.executable, "-c", "import torch, transformers; print(torch.__version__, "
                                   "transformers.__version__)"], capture_output=True, text=True).stdout.split()
        print(f"machine: {machine()}, torch {versions[0]}, transformers {versions[1]}")
        print("job: halfsafe fix MODEL --layerwise --no-verify --device cpu (37 bundled calibration prompts)\n")
        print("| shape | layers | fp32 weights | write checkpoint | fix time | time per layer | peak RSS |")
        print("|---|---|---|---|---|---|---|")
        for shape, layers in jobs:
            source, out = root / f"{shape}-{layers}", root / f"{shape}-{layers}-fixed"
            shutil.rmtree(source, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            check_disk(root, shape, layers)
            written, _, text = run([sys.executable, "-c", _WRITE, str(source), str(layers), json.dumps(SHAPES[shape]),
                                    CONFIGS[shape], "plant" if shape in PLANTED else "none",
                                    str(Path(__file__).resolve().parents[1])])
            params = int(text.strip().splitlines()[-1])
            if shape == "llama3-70b":
                fix_70b(source, out, layers, params, written)
            else:
                seconds, peak, _ = run([sys.executable, "-m", "halfsafe", "fix", str(source), "--layerwise",
                                        "--no-verify", "--device", "cpu", "--out", str(out)])
                print(f"| {shape} | {layers} | {params * 4 / 1e9:.1f} GB | {written:.0f} s | {seconds:.0f} s | "
                      f"{seconds / layers:.1f} s | {peak / 1e9:.2f} GB |", flush=True)
            if shape == "qwen3-8b":
                prompts = root / "prompts.txt"
                prompts.write_text("The capital of France is\n上海有个非常出名的地方，\ndef add(a, b):\n1 + 1 =\n",
                                   encoding="utf-8")
                seconds, peak, _ = run([sys.executable, "-m", "halfsafe", "diagnose", str(source), "--layerwise",
                                        "--device", "cpu", "--prompts", str(prompts)])
                print(f"| {shape} diagnose (4 prompts; fp32 observation, float16 and bfloat16 confirmation) | "
                      f"{layers} | {params * 4 / 1e9:.1f} GB | | {seconds:.0f} s | {seconds / layers:.1f} s | "
                      f"{peak / 1e9:.2f} GB |", flush=True)
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(source, ignore_errors=True)
    finally:  # the checkpoints take gigabytes: never left behind, even by a failed run
        for shape, layers in jobs:
            shutil.rmtree(root / f"{shape}-{layers}", ignore_errors=True)
            shutil.rmtree(root / f"{shape}-{layers}-fixed", ignore_errors=True)
            shutil.rmtree(root / f".{shape}-{layers}-fixed.halfsafe-partial", ignore_errors=True)
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
