"""Every bad input, through the command line, on tiny checkpoints.

Each case asserts the exit code, one `halfsafe: error:` line that names the problem, no
traceback, nothing written (no --out, no hidden partial directory, no JSON or plot) and every
input file byte-identical afterwards. Most run in-process (`main([...])`); a few run as a real
`python -m halfsafe` to prove that no traceback reaches stderr.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from halfsafe.cli import main
from tests.support.models import VOCAB, build_tiny_model, byte_tokenizer, save_tiny_model, save_unregistered_model
from tests.support.planted import tiny_model

LINUX = sys.platform.startswith("linux")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """One folder of good and broken checkpoints and prompt files, shared by every case."""
    root = tmp_path_factory.mktemp("inputs")
    llama = save_tiny_model("llama", root / "llama", plant=None)
    save_unregistered_model(root / "gpt2")  # 64 learned positions
    ctrl = tiny_model("ctrl", vocab_size=VOCAB)  # its roles are refused: a constant enters the stream
    ctrl.save_pretrained(str(root / "ctrl"))
    byte_tokenizer().save_pretrained(str(root / "ctrl"))
    save_unregistered_model(root / "smallvocab", vocab_size=100)  # the byte tokenizer's ids reach 258
    # transformers' xLSTM does not run in float16 past one chunk (an fp32 gate meets a float16 product)
    xlstm = tiny_model("xlstm", vocab_size=VOCAB)
    xlstm.save_pretrained(str(root / "xlstm"))
    byte_tokenizer().save_pretrained(str(root / "xlstm"))
    (root / "overrides-badjson.json").write_text("{not json\n")
    (root / "overrides-nowhy.json").write_text('{"LlamaForCausalLM": {"layers": "model.layers"}}\n')
    (root / "overrides-wrongpath.json").write_text(
        '{"LlamaForCausalLM": {"why": "a user names the stack", "layers": "model.blocks"}}\n')
    (root / "empty").mkdir()
    _copy(llama, root / "badconfig").joinpath("config.json").write_text("{not json\n")
    _copy(llama, root / "noweights").joinpath("model.safetensors").unlink()
    weights = _copy(llama, root / "truncated").joinpath("model.safetensors")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    notokenizer = _copy(llama, root / "notokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (notokenizer / name).unlink()
    model = build_tiny_model("llama", plant=None)
    for name in ("pickle", "pickle-truncated"):
        model.config.save_pretrained(str(root / name))
        torch.save(model.state_dict(), root / name / "pytorch_model.bin")  # the legacy pickle format
        byte_tokenizer().save_pretrained(str(root / name))
    broken = root / "pickle-truncated" / "pytorch_model.bin"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    _write_truncated_gguf(root / "truncated.gguf")
    (root / "existing").mkdir()
    (root / "existing" / "keep.txt").write_text("a user's file\n")
    (root / "afile").write_text("not a directory\n")
    prompts = {
        "ok.txt": "The capital of France is\n",
        "empty.txt": "",
        "blank.txt": "\n   \n\t\n",
        "notext.jsonl": '{"prompt": "x"}\n',
        "broken.jsonl": '{"text": "fine"}\n{"text": \n',
        "long.txt": "word " * 100 + "\n",  # 501 tokens: past the 64 positions of the GPT-2 fixture
    }
    for name, text in prompts.items():
        (root / name).write_text(text, encoding="utf-8")
    (root / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    return root


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _write_truncated_gguf(path: Path) -> None:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((320, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root` (hidden ones too): a file's sha256, or 'dir'."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's usage errors
        return exc.code


# name -> (arguments, a piece of the one-line message). `{in}` is the inputs folder, `{out}` an
# empty folder that must stay empty. All exit 2.
CASES = {
    "nonexistent path": (["diagnose", "{in}/nowhere"], "model path '{in}/nowhere' does not exist"),
    "empty directory": (["diagnose", "{in}/empty"], "has no config.json"),
    "invalid config.json": (["diagnose", "{in}/badconfig"], "config.json' is not valid JSON"),
    "no weights": (["diagnose", "{in}/noweights"], "has a config.json but no weights"),
    "truncated safetensors": (["diagnose", "{in}/truncated"], "model.safetensors' is truncated: "),
    "truncated GGUF": (["diagnose", "{in}/truncated.gguf"], "is truncated or corrupt"),
    "pickle only": (["diagnose", "{in}/pickle"], "holds only pickle weights (pytorch_model.bin)"),
    "truncated pickle, --allow-pickle": (["diagnose", "{in}/pickle-truncated", "--allow-pickle"],
                                         "could not load the model in"),
    "no tokenizer": (["diagnose", "{in}/notokenizer"], "has no tokenizer: none of tokenizer.json"),
    "tokenizer past the vocabulary": (["diagnose", "{in}/smallvocab"],
                                      "has ids up to 258 but the model's embedding has 100 rows"),
    "unknown dtype": (["diagnose", "{in}/llama", "--dtype", "float7"], "unknown dtype 'float7'"),
    "--margin inf": (["fix", "{in}/llama", "--out", "{out}/fixed", "--margin", "inf"],
                     "--margin inf must be a finite number of at least 1"),
    "existing --out": (["fix", "{in}/llama", "--out", "{in}/existing"], "already exists; choose a new directory"),
    "--out is the input": (["fix", "{in}/llama", "--out", "{in}/llama"], "overlaps the input checkpoint"),
    "--out under a missing directory": (["fix", "{in}/llama", "--out", "{out}/no/fixed"], "does not exist"),
    "--out under a file": (["fix", "{in}/llama", "--out", "{in}/afile/fixed"], "is a file, not a directory"),
    "--out in /proc (uncreatable)": pytest.param(["fix", "{in}/llama", "--out", "/proc/halfsafe-fixed"],
                                                 "nothing can be created in '/proc'",
                                                 marks=pytest.mark.skipif(not LINUX, reason="Linux /proc")),
    "--out in /sys (unwritable)": pytest.param(["fix", "{in}/llama", "--out", "/sys/halfsafe-fixed"],
                                               "nothing can be created in '/sys'",
                                               marks=pytest.mark.skipif(not LINUX, reason="Linux /sys")),
    "--json in /proc": pytest.param(["diagnose", "{in}/llama", "--json", "/proc/halfsafe.json"],
                                    "nothing can be created in '/proc'",
                                    marks=pytest.mark.skipif(not LINUX, reason="Linux /proc")),
    "--plot is a directory": (["diagnose", "{in}/llama", "--plot", "{out}"], "is a directory; give a file name"),
    "empty prompt file": (["diagnose", "{in}/llama", "--prompts", "{in}/empty.txt"], "has no prompts"),
    "whitespace-only prompt file": (["fix", "{in}/llama", "--out", "{out}/fixed", "--heldout", "{in}/blank.txt"],
                                    "has no prompts"),
    "non-UTF-8 prompt file": (["diagnose", "{in}/llama", "--prompts", "{in}/latin1.txt"], "is not UTF-8 text"),
    "JSONL without text": (["compare", "{in}/llama", "--texts", "{in}/notext.jsonl"],
                           "line 1 has no non-empty string field 'text'"),
    "JSONL with an invalid line": (["diagnose", "{in}/llama", "--prompts", "{in}/broken.jsonl"],
                                   "line 2 is not valid JSON"),
    "--top-k -3": (["generate", "{in}/llama", "--prompt", "hi", "--top-k", "-3"],
                   "--top-k -3 has to be an integer of at least 0"),
    "--top-k 2.5": (["generate", "{in}/llama", "--prompt", "hi", "--top-k", "2.5"],
                    "argument --top-k: invalid int value: '2.5'; see 'halfsafe generate --help'"),
    "--top-p 0": (["generate", "{in}/llama", "--prompt", "hi", "--top-p", "0"], "--top-p 0.0 has to be in (0, 1]"),
    "--top-p 1.5": (["generate", "{in}/llama", "--prompt", "hi", "--top-p", "1.5"], "--top-p 1.5 has to be in (0, 1]"),
    "--temperature -1": (["generate", "{in}/llama", "--prompt", "hi", "--temperature", "-1"],
                         "--temperature -1.0 has to be a finite number of at least 0"),
    "--temperature nan": (["generate", "{in}/llama", "--prompt", "hi", "--temperature", "nan"],
                          "--temperature nan has to be a finite number"),
    "--repetition-penalty 0": (["generate", "{in}/llama", "--prompt", "hi", "--repetition-penalty", "0"],
                               "--repetition-penalty 0.0 has to be a finite number above 0"),
    "--max-new-tokens 0": (["generate", "{in}/llama", "--prompt", "hi", "--max-new-tokens", "0"],
                           "--max-new-tokens 0 has to be an integer of at least 1"),
    "--seed -1": (["generate", "{in}/llama", "--prompt", "hi", "--seed", "-1"], "--seed -1 has to be an integer"),
    "empty prompt": (["generate", "{in}/llama", "--prompt", ""], "no prompt: pass --prompt TEXT"),
    "whitespace prompt": (["generate", "{in}/llama", "--prompt", "  \t"], "no prompt: pass --prompt TEXT"),
    "prompt past the positions": (["generate", "{in}/gpt2", "--prompt-file", "{in}/long.txt", "--greedy"],
                                  "the prompt has 501 tokens and the model only 64 positions"),
    "unknown variant": (["compare", "{in}/llama", "--variants", "fp32,fp8"], "unknown variant 'fp8'"),
    "empty --variants": (["compare", "{in}/llama", "--variants", " , "], "--variants is empty"),
    "fixed: pointing nowhere": (["compare", "{in}/llama", "--variants", "fp32,fixed:{in}/nowhere"],
                                "is not a directory; give an exported checkpoint"),
    "roles refused": (["fix", "{in}/ctrl", "--out", "{out}/fixed", "--prompts", "{in}/ok.txt"],
                      "CTRLLMHeadModel cannot be rescaled exactly: what enters transformer.h.0 cannot be scaled"),
    "unregistered architecture, keep-fp32 with --out": (
        ["fix", "{in}/gpt2", "--strategy", "keep-fp32", "--out", "{out}/fixed"],
        "--strategy keep-fp32 cannot be exported"),
    "unregistered architecture, --layerwise": (["diagnose", "{in}/gpt2", "--layerwise", "--prompts", "{in}/ok.txt"],
                                               "layer-wise mode cannot run GPT2LMHeadModel"),
    "a model transformers cannot run in float16": (
        ["diagnose", "{in}/xlstm", "--device", "cpu"],
        "xLSTMForCausalLM fails to run with its weights in float16 (expected m1 and m2 to have the same dtype"),
    "--overrides missing": (["diagnose", "{in}/llama", "--overrides", "{in}/nowhere.json"],
                            "--overrides {in}/nowhere.json: no such file; give a JSON object mapping"),
    "--overrides not JSON": (["diagnose", "{in}/llama", "--overrides", "{in}/overrides-badjson.json"],
                             "is not JSON (Expecting property name enclosed in double quotes, line 1)"),
    "--overrides entry without why": (["fix", "{in}/llama", "--out", "{out}/fixed", "--overrides",
                                       "{in}/overrides-nowhy.json"],
                                      "override 'LlamaForCausalLM' must give 'why' and one of layers"),
    "--overrides naming a missing stack": (["fix", "{in}/llama", "--out", "{out}/fixed", "--overrides",
                                            "{in}/overrides-wrongpath.json", "--prompts", "{in}/ok.txt"],
                                           "the override for LlamaForCausalLM says the decoder layers are "
                                           "'model.blocks', which LlamaForCausalLM does not have"),
}


@pytest.mark.parametrize("args, message", CASES.values(), ids=CASES.keys())
def test_bad_input_is_one_line_exit_2_and_writes_nothing(inputs, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    out.mkdir()
    before = _snapshot(inputs)
    fill = lambda text: text.replace("{in}", str(inputs)).replace("{out}", str(out))  # noqa: E731
    argv = [fill(a) for a in args]
    if argv[0] in ("diagnose", "compare") and "--json" not in argv:
        argv += ["--json", str(out / "report.json")]  # must not appear
    assert _run(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("halfsafe: error: ")]
    assert len(errors) == 1 and err.rstrip().splitlines()[-1] == errors[0], err
    assert fill(message) in errors[0]
    assert list(out.iterdir()) == []  # no output, no hidden partial directory
    assert _snapshot(inputs) == before  # inputs byte-identical, nothing added beside them


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "halfsafe", *args], capture_output=True, text=True, cwd=cwd,
                          env=dict(os.environ), timeout=300)


@pytest.mark.skipif(not LINUX, reason="Linux /proc")
def test_a_real_process_prints_one_line_and_no_traceback(inputs, tmp_path):
    """Two of the issue's cases as a user runs them: an uncreatable --out (which used to fail
    after the work, inside the export) and a sampling argument transformers rejects."""
    cases = [
        (["fix", str(inputs / "llama"), "--out", "/proc/halfsafe-fixed"], "nothing can be created in '/proc'"),
        (["generate", str(inputs / "llama"), "--prompt", "hi", "--top-k", "-3"], "--top-k -3 has to be"),
    ]
    before = _snapshot(inputs)
    for args, message in cases:
        done = _cli(*args, cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("halfsafe: error: ") and message in lines[0], done.stderr
    assert list(tmp_path.iterdir()) == [] and _snapshot(inputs) == before


# -- inputs that used to fail and now run ------------------------------------------------------


def test_too_long_prompts_are_truncated_with_a_notice(inputs, tmp_path, capsys):
    """GPT-2-shaped models have a learned table of positions; a prompt past it used to raise
    IndexError from the embedding. The command line truncates it and says so."""
    report = tmp_path / "d.json"
    assert _run(["diagnose", str(inputs / "gpt2"), "--prompts", str(inputs / "long.txt"), "--json", str(report),
                 "--dtype", "bfloat16"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    notes = [line for line in err.splitlines() if line.startswith("halfsafe: note: ")]
    assert notes == ["halfsafe: note: 1 of 1 calibration prompts (0) longer than the model's 64 positions less 12 "
                     "generated after them: truncated to their first 52 tokens"]
    assert json.loads(report.read_text())["num_prompts"] == 1


def test_the_bundled_long_passage_fits_by_truncation_and_is_refused_whole(inputs):
    """The bundled long passage (1,159 bytes) is past a GPT-2-shaped model's positions: the
    library refuses it in one line, `fit_prompts` (what the command line uses) cuts it."""
    from halfsafe.errors import HalfsafeError
    from halfsafe.model.loading import load_model
    from halfsafe.prompts import bundled_prompts, check_prompt_lengths, fit_prompts

    loaded = load_model(str(inputs / "gpt2"))
    prompts = bundled_prompts()
    with pytest.raises(HalfsafeError, match=r"has \d+ tokens, more than the 64 the model has room for"):
        check_prompt_lengths(loaded.model, loaded.tokenizer, prompts)
    fitted, notice = fit_prompts(loaded.model, loaded.tokenizer, prompts)
    assert notice and "truncated to their first 64 tokens" in notice
    lengths = [len(loaded.tokenizer(p)["input_ids"]) for p in fitted]
    assert max(lengths) == 64  # the longest prefix that fits, not a shorter one
    assert all(p.startswith(f) for p, f in zip(prompts, fitted, strict=True))
    check_prompt_lengths(loaded.model, loaded.tokenizer, fitted)


def test_keep_fp32_runs_on_an_unregistered_architecture(inputs, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert _run(["fix", str(inputs / "gpt2"), "--strategy", "keep-fp32", "--plan-json", str(plan),
                 "--prompts", str(inputs / "long.txt"), "--heldout", str(inputs / "ok.txt")]) == 0
    captured = capsys.readouterr()
    assert "truncated to their first 64 tokens" in captured.err
    assert "plan (keep-fp32)" in captured.out
    assert json.loads(plan.read_text())["strategy"] == "keep-fp32"


def test_an_unregistered_architecture_is_rescaled_through_derived_roles(inputs, tmp_path):
    """GPT-2 is outside the hand-written reference: its roles are derived from the model, proven exact in fp32,
    and the export goes through the same path as every other model."""
    out = tmp_path / "fixed"
    assert _run(["fix", str(inputs / "gpt2"), "--out", str(out), "--prompts", str(inputs / "ok.txt"),
                 "--heldout", str(inputs / "ok.txt"), "--device", "cpu"]) == 0
    block = json.loads((out / "config.json").read_text())["halfsafe"]
    assert block["plan"]["architecture"] == "GPT2LMHeadModel" and block["exactness"]["equal"]
    assert (out / "model.safetensors").exists()


def test_generation_past_the_positions_is_shortened_with_a_notice(inputs, capsys):
    assert _run(["generate", str(inputs / "gpt2"), "--prompt", "hello", "--greedy", "--max-new-tokens", "100",
                 "--json", "-"]) == 0
    captured = capsys.readouterr()
    assert ("advice: --max-new-tokens 100 shortened to 58: the prompt takes 6 of the model's 64 positions"
            in captured.err)
    assert len(json.loads(captured.out)["tokens"]) <= 58


def test_pickle_weights_load_with_allow_pickle(inputs, capsys):
    before = _snapshot(inputs)
    assert _run(["diagnose", str(inputs / "pickle"), "--allow-pickle", "--prompts", str(inputs / "ok.txt")]) == 0
    assert "float16: safe" in capsys.readouterr().out
    assert _snapshot(inputs) == before
