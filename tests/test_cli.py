import json

import pytest

from halfsafe.cli import EXIT_UNSAFE, main

REQUIRED = {"schema_version", "model", "dtype", "safe", "max_abs", "max_site", "headroom", "first_nonfinite",
            "layers", "sites", "verdicts"}


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("The capital of France is\n上海有个非常出名的地方，\n", encoding="utf-8")
    return path


def test_diagnose_writes_json_and_plot_and_fails_on_unsafe(tiny_dirs, tmp_path, prompts_file, capsys):
    out_json, out_png = tmp_path / "d.json", tmp_path / "d.png"
    code = main(["diagnose", str(tiny_dirs["gemma3_text", "residual"]), "--prompts", str(prompts_file),
                 "--json", str(out_json), "--plot", str(out_png), "--fail-on-unsafe", "--device", "cpu"])
    assert code == EXIT_UNSAFE
    stdout = capsys.readouterr().out
    assert "float16: UNSAFE - " in stdout and "bfloat16: safe" in stdout
    data = json.loads(out_json.read_text())
    assert REQUIRED <= set(data)
    assert data["schema_version"] == 1 and data["dtype"] == "float16" and data["safe"] is False
    assert data["max_abs"] > 65504 and data["headroom"] < 1
    assert data["first_nonfinite"].startswith("model.layers.1.")
    assert len(data["layers"]) == 4 and data["verdicts"][1]["dtype"] == "bfloat16"
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_safe_model_exits_zero_even_with_fail_on_unsafe(tiny_dirs, prompts_file, capsys):
    code = main(["diagnose", str(tiny_dirs["qwen3", None]), "--prompts", str(prompts_file), "--fail-on-unsafe"])
    assert code == 0
    assert "float16: safe - headroom" in capsys.readouterr().out


def test_unsafe_without_flag_exits_zero(tiny_dirs, prompts_file):
    assert main(["diagnose", str(tiny_dirs["llama", "residual"]), "--prompts", str(prompts_file)]) == 0


def test_bfloat16_target(tiny_dirs, prompts_file, capsys):
    args = ["diagnose", str(tiny_dirs["llama", "residual"]), "--prompts", str(prompts_file), "--dtype", "bf16"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "bfloat16: safe" in out and "float16: UNSAFE" not in out


def _bad(tmp_path, tiny_dirs, prompts_file):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    model = str(tiny_dirs["llama", None])
    return {
        "missing model": (["diagnose", str(tmp_path / "nope")], "does not exist"),
        "unknown dtype": (["diagnose", model, "--dtype", "float8"], "unknown dtype 'float8'"),
        "empty prompts": (["diagnose", model, "--prompts", str(empty)], "has no prompts"),
        "json into missing dir": (["diagnose", model, "--json", str(tmp_path / "no" / "x.json")], "does not exist"),
        "bad margin": (["diagnose", model, "--margin", "0.5"], "--margin 0.5 must be a finite number of at least 1"),
        "bad device": (["diagnose", model, "--device", "tpu", "--prompts", str(prompts_file)], "device"),
    }


@pytest.mark.parametrize("case", ["missing model", "unknown dtype", "empty prompts", "json into missing dir",
                                  "bad margin", "bad device"])
def test_bad_inputs_give_one_line_and_exit_2(tiny_dirs, tmp_path, prompts_file, capsys, case):
    args, message = _bad(tmp_path, tiny_dirs, prompts_file)[case]
    out_json = tmp_path / "never.json"
    assert main([*args, "--json", str(out_json)] if "--json" not in args else args) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("halfsafe: error: ") and message in lines[0], err
    assert "Traceback" not in err
    assert not out_json.exists()  # nothing half-written
