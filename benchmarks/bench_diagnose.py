"""Time and peak memory of `diagnose` on the demo model, after it is loaded.

Target on a 2-core CPU machine: under 60 s, and peak resident memory during diagnose under
twice the fp32 model's size. Run: python benchmarks/bench_diagnose.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import PeakRSS, machine, model_bytes  # noqa: E402
from halfsafe.cli.session import quiet_transformers  # noqa: E402
from halfsafe.diagnosing import diagnose  # noqa: E402
from halfsafe.model.layers import encode, last_logits_only  # noqa: E402
from halfsafe.model.loading import load_model  # noqa: E402
from halfsafe.prompts import bundled_prompts  # noqa: E402
from halfsafe.timing import now  # noqa: E402


def main() -> None:
    quiet_transformers()
    print(f"machine: {machine()}")
    loaded = load_model("demo")
    prompts = bundled_prompts()
    size = model_bytes(loaded.model)
    # Plain fp32 inference over the same prompts first: it pages the weights in and gives the
    # floor that any tool running this model pays.
    with PeakRSS() as plain, torch.inference_mode():
        for prompt in prompts:
            loaded.model(**encode(loaded.tokenizer, prompt, "cpu"), use_cache=False, **last_logits_only(loaded.model))
    with PeakRSS() as memory:
        started = now()
        result = diagnose(loaded.model, loaded.tokenizer, prompts, name=loaded.name)
        seconds = now() - started
    print(f"model: {loaded.name}, fp32 size {size / 2**30:.2f} GiB, {len(prompts)} prompts")
    print(f"verdict: {result.target.summary}")
    print(f"diagnose time: {seconds:.1f} s (target < 60 s)")
    print(f"peak resident memory, whole process: plain fp32 inference {plain.peak / 2**30:.2f} GiB "
          f"({plain.peak / size:.2f}x the fp32 weights); diagnose {memory.peak / 2**30:.2f} GiB "
          f"({memory.peak / size:.2f}x; target < 2x)")


if __name__ == "__main__":
    main()
