import json

import pytest

from halfsafe.cli import main
from halfsafe.comparing import compare, parse_variants
from halfsafe.errors import HalfsafeError
from halfsafe.model.loading import load_model
from tests.support.models import SHORT_PROMPTS


def test_compare_on_a_planted_model(tiny_dirs, tmp_path, short_prompt_args):
    loaded = load_model(str(tiny_dirs["qwen3", "residual"]))
    fixed_dir = tmp_path / "fixed"
    assert main(["fix", str(tiny_dirs["qwen3", "residual"]), "--out", str(fixed_dir), *short_prompt_args]) == 0
    names = parse_variants(f"fp32,bf16,fp16,fp16-clamp,fp16-fixed,fixed:{fixed_dir}")
    results = {r.variant: r for r in compare(loaded.model, loaded.tokenizer, SHORT_PROMPTS, names,
                                             calibration=SHORT_PROMPTS, new_tokens=8)}
    f = {name: r.fidelity for name, r in results.items()}
    assert f["fp32"].kl_mean == 0 and f["fp32"].top1 == 1 and f["fp32"].greedy_identical == 1
    assert f["fp16"].nonfinite_share == 1 and f["fp16"].kl_mean == float("inf")
    assert f["fp16"].perplexity == float("inf")
    for name in ("bf16", "fp16-clamp", "fp16-fixed", f"fixed:{fixed_dir}"):
        assert f[name].nonfinite_share == 0, name
    assert f["fp16-fixed"].kl_mean < f["bf16"].kl_mean
    # The exported checkpoint is the in-memory fix, bit for bit.
    assert f[f"fixed:{fixed_dir}"].kl_mean == pytest.approx(f["fp16-fixed"].kl_mean, rel=1e-9)
    assert f["fp32"].perplexity == pytest.approx(f["fp16-fixed"].perplexity, rel=1e-2)
    assert results["fp16"].weights_bytes * 2 == results["fp32"].weights_bytes
    assert all(r.tokens_per_s_batch1 > 0 and r.tokens_per_s_batch8 > 0 for r in results.values())


def test_compare_command_writes_json_and_plot(tiny_dirs, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(SHORT_PROMPTS), encoding="utf-8")
    out_json, out_png = tmp_path / "c.json", tmp_path / "c.png"
    args = ["compare", str(tiny_dirs["llama", "residual"]), "--texts", str(texts), "--new-tokens", "4", "--no-speed",
            "--json", str(out_json), "--plot", str(out_png)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "fp16-fixed" in printed and "KL mean" in printed
    data = json.loads(out_json.read_text())
    assert [v["variant"] for v in data["variants"]] == ["fp32", "bf16", "fp16", "fp16-fixed"]
    assert data["variants"][2]["fidelity"]["kl_mean"] == "inf"
    assert out_png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("spec, message", [
    ("fp32,fp8", "unknown variant 'fp8'"),
    ("fp32,fp32", "names a variant twice"),
    (",", "--variants is empty"),
])
def test_bad_variant_lists(spec, message):
    with pytest.raises(HalfsafeError, match=message):
        parse_variants(spec)


def test_fixed_directory_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(HalfsafeError, match="no config.json"):
        parse_variants(f"fp32,fixed:{tmp_path}")
    with pytest.raises(HalfsafeError, match="is not a directory"):
        parse_variants(f"fixed:{tmp_path / 'missing'}")


def test_empty_texts_file_is_one_line(tiny_dirs, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["compare", str(tiny_dirs["llama", None]), "--texts", str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no prompts" in err[0]
