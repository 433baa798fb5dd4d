"""The model card `fix` writes beside the weights: both export paths, from the `halfsafe` block."""

from __future__ import annotations

import json
import shutil

from halfsafe.fixing.export import export_checkpoint
from halfsafe.fixing.fix import fix
from halfsafe.fixing.modelcard import model_card, write_model_card
from halfsafe.layerwise.jobs import fix_layerwise, open_layerwise
from halfsafe.model.loading import load_model
from halfsafe.prompts import HELDOUT, bundled_prompts

CALIBRATION = bundled_prompts()[:6]
HELD = bundled_prompts(HELDOUT)[:3]


def test_in_memory_and_layerwise_exports_write_the_same_card(tiny_dirs, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(tiny_dirs["gemma3_text", "residual"], source)
    (source / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: en\ntags:\n- x\n---\n# a model\n")
    loaded = load_model(str(source))
    model, report = fix(loaded.model, loaded.tokenizer, calibration=CALIBRATION, heldout=HELD)
    export_checkpoint(model, loaded.tokenizer, tmp_path / "in-memory")
    fix_layerwise(open_layerwise(source), loaded.tokenizer, tmp_path / "layerwise", calibration=CALIBRATION,
                  heldout=HELD)
    cards = [(tmp_path / name / "README.md").read_text() for name in ("in-memory", "layerwise")]
    front = cards[0].split("---")[1]
    assert "license: apache-2.0" in front and "language: en" in front and "- halfsafe" in front
    assert "base_model" not in front  # a local directory does not say which hub model it is
    assert "residual stream scaled by 0.125" in cards[0]
    assert f"| fixed (this checkpoint) | 0% | {report.fixed.kl_mean:.2g} |" in cards[0]
    assert cards[0].splitlines()[:12] == cards[1].splitlines()[:12]  # front matter and plan


def test_a_hub_snapshot_names_its_base_model(tmp_path):
    config = {"model_type": "llama", "halfsafe": {"version": "0.1.0", "strategy": "rescale",
                                                  "plan": {"dtype": "float16", "residual_scale": 0.5},
                                                  "verification": {"prompts": 3, "max_kl": None}}}
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config))
    snapshot = tmp_path / "hub" / "models--org--name" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    card = write_model_card(out, snapshot).read_text()
    assert "base_model: org/name" in card and "Not verified" in card


def test_a_checkpoint_without_a_halfsafe_block_gets_no_card(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert write_model_card(tmp_path) is None and not (tmp_path / "README.md").exists()
    assert "fixed for float16" in model_card({"halfsafe": {"plan": {"dtype": "float16"}}})


def test_a_block_whose_exactness_has_no_exact_key_is_shown_as_not_proven():
    block = {"strategy": "rescale", "plan": {"dtype": "float16", "residual_scale": 0.125},
             "exactness": {"max_delta": 0.0, "equal": True, "prompts": 2}}
    card = model_card({"halfsafe": block})
    assert "Not proven exact" in card and "exact: true" not in card
    assert "exact: true" in model_card({"halfsafe": {**block, "exactness": {**block["exactness"], "exact": True}}})
