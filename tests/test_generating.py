"""`halfsafe generate` and its advice, on tiny planted checkpoints."""

import io
import json

import pytest
import torch

from halfsafe.advising import choose_dtype, generation_advice, is_instruct, normalise_generation_kwargs
from halfsafe.cli import main
from tests.support.models import byte_tokenizer


def _generate(tiny_dirs, *args, arch="gemma3_text", plant="residual"):
    return main(["generate", str(tiny_dirs[arch, plant]), "--device", "cpu", *args])


def test_generate_float16_recovers_and_writes_json_and_events(tiny_dirs, tmp_path, capsys):
    events = tmp_path / "events.jsonl"
    code = _generate(tiny_dirs, "--prompt", "The capital of France is", "--dtype", "float16", "--greedy",
                     "--max-new-tokens", "8", "--json", "-", "--events", str(events))
    assert code == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # stdout holds the JSON alone
    assert {"text", "tokens", "events", "recovered_steps", "dtype", "seconds"} <= set(result)
    assert result["dtype"] == "float16" and result["recovered_steps"] == [0]
    assert 0 < len(result["tokens"]) <= 8 and 0 not in result["tokens"]
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    assert [(e["step"], e["kind"]) for e in lines[:2]] == [(0, "nonfinite"), (0, "recovered")]
    assert lines[0]["module"].startswith("model.layers.1")
    assert "guard: float16;" in captured.err
    assert "recovered 1 non-finite step(s)" in captured.err


def test_generate_streams_text_from_stdin_with_auto_dtype(tiny_dirs, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("def add(a, b):\n"))
    assert _generate(tiny_dirs, "--max-new-tokens", "5", "--seed", "0", "--temperature", "0.9",
                     "--repetition-penalty", "1.1", plant=None) == 0
    captured = capsys.readouterr()
    assert captured.out.strip()  # the streamed continuation
    assert "dtype auto: float32 on cpu" in captured.err
    assert "guard: float32; 5 steps" in captured.err


def test_generate_raise_policy_exits_5_with_one_line(tiny_dirs, capsys):
    code = _generate(tiny_dirs, "--prompt", "hi", "--dtype", "fp16", "--on-nonfinite", "raise")
    assert code == 5
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("halfsafe: error: step 0: the logits of row 0 are non-finite in float16")
    assert "Traceback" not in "".join(err)


def test_generate_prompt_file_is_one_batch(tiny_dirs, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("The capital of France is\n上海有个非常出名的地方，\n", encoding="utf-8")
    out = tmp_path / "r.json"
    assert _generate(tiny_dirs, "--prompt-file", str(prompts), "--dtype", "float16", "--greedy",
                     "--max-new-tokens", "4", "--json", str(out)) == 0
    result = json.loads(out.read_text())
    assert len(result["text"]) == 2 and result["prompts"][1] == "上海有个非常出名的地方，"
    assert {e["row"] for e in result["events"] if e["kind"] == "recovered"} == {0, 1}


@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens 0 has to be an integer of at least 1"),
    (["--top-p", "2"], "--top-p 2.0 has to be in (0, 1]"),
    (["--temperature", "-1"], "--temperature -1.0 has to be a finite number of at least 0"),
    (["--dtype", "float8"], "unknown dtype 'float8'"),
    (["--chat"], "has no chat template, so it is a base model"),
    (["--events", "/nonexistent/dir/e.jsonl"], "does not exist"),
])
def test_generate_bad_inputs_give_one_line_and_exit_2(tiny_dirs, tmp_path, capsys, args, message):
    out = tmp_path / "never.json"
    assert _generate(tiny_dirs, "--prompt", "hi", "--json", str(out), *args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("halfsafe: error: ") and message in lines[-1], lines
    assert not out.exists()


def test_generate_without_any_prompt_says_how_to_give_one(tiny_dirs, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert _generate(tiny_dirs) == 2
    assert "no prompt: pass --prompt TEXT, --prompt-file FILE" in capsys.readouterr().err


# -- advice -----------------------------------------------------------------------------------


def test_dtype_auto_reads_the_compute_capability_not_is_bf16_supported(monkeypatch):
    assert choose_dtype(torch.device("cpu")).dtype == torch.float32
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what it answers on a T4
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    t4 = choose_dtype(torch.device("cuda"))
    assert t4.dtype == torch.float16 and t4.fix and "7.5 < 8.0" in t4.reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    a100 = choose_dtype(torch.device("cuda"))
    assert a100.dtype == torch.bfloat16 and not a100.fix


def test_base_and_instruct_models_get_the_right_advice():
    base = byte_tokenizer()
    assert not is_instruct("google/gemma-3-270m", base)
    assert is_instruct("google/gemma-3-270m-it", base) and is_instruct("Qwen/Qwen2.5-0.5B-Instruct", base)
    greedy = generation_advice("gemma-3-270m", base, do_sample=False, temperature=None, repetition_penalty=None,
                               chat=False)
    assert greedy == ["base model with greedy decoding: base models tend to loop; "
                      "try temperature 0.7-1.0 with repetition_penalty 1.1"]
    cold = generation_advice("gemma-3-270m", base, do_sample=True, temperature=0.1, repetition_penalty=1.1,
                             chat=False)
    assert len(cold) == 1 and cold[0].startswith("base model with temperature 0.1")
    assert generation_advice("gemma-3-270m", base, do_sample=True, temperature=0.8, repetition_penalty=1.1,
                             chat=False) == []
    assert "instruct variant" in generation_advice("gemma-3-270m", base, do_sample=True, temperature=0.8,
                                                   repetition_penalty=1.1, chat=True)[0]
    assert generation_advice("Qwen2.5-0.5B-Instruct", base, do_sample=False, temperature=None,
                             repetition_penalty=None, chat=True) == []


def test_temperature_zero_becomes_greedy_and_other_kwargs_are_kept():
    kwargs, advice = normalise_generation_kwargs({"do_sample": True, "temperature": 0, "max_new_tokens": 3})
    assert kwargs == {"do_sample": False, "temperature": None, "top_p": None, "top_k": None, "max_new_tokens": 3}
    assert advice == ["temperature=0 with sampling is greedy decoding; decoding greedily"]
    same, none = normalise_generation_kwargs({"do_sample": True, "temperature": 0.7})
    assert same == {"do_sample": True, "temperature": 0.7} and none == []


def test_auto_on_an_fp16_only_gpu_fixes_once_and_casts_a_fixed_checkpoint(tiny_dirs, tmp_path, monkeypatch):
    """`--dtype auto` below compute capability 8.0: fix in memory, unless the checkpoint is fixed."""
    from rich.console import Console

    import halfsafe.advising
    from halfsafe.advising import DtypeChoice
    from halfsafe.cli.session import load_for_generation
    from halfsafe.fixing.export import export_checkpoint

    monkeypatch.setattr(halfsafe.advising, "choose_dtype",
                        lambda device: DtypeChoice(torch.float16, True, "float16 with halfsafe's fix on a T4"))
    console = Console(file=io.StringIO())
    loaded, notes = load_for_generation(str(tiny_dirs["llama", "residual"]), console, dtype="auto", device="cpu")
    assert next(loaded.model.parameters()).dtype == torch.float16 and loaded.model.config.halfsafe
    assert notes == ["dtype auto: float16 with halfsafe's fix on a T4"]

    export_checkpoint(loaded.model, loaded.tokenizer, tmp_path / "fixed")
    again, notes = load_for_generation(str(tmp_path / "fixed"), console, dtype="auto", device="cpu")
    assert next(again.model.parameters()).dtype == torch.float16
    assert notes[-1] == "the checkpoint is already fixed by halfsafe"
    ids = again.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert torch.isfinite(again.model(input_ids=ids).logits).all()
