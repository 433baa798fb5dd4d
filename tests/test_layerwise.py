"""Layer-wise diagnose and fix: the in-memory results, one layer at a time, within a memory cap."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from halfsafe.cli import main
from halfsafe.errors import HalfsafeError
from halfsafe.fixing.export import export_checkpoint
from halfsafe.fixing.fix import fix
from halfsafe.fixing.observe import observe
from halfsafe.layerwise import LayerwiseModel, observe_layerwise
from halfsafe.layerwise.jobs import diagnose_layerwise, fix_layerwise, open_layerwise, parse_memory, work_dir_for
from halfsafe.model.loading import load_model, load_tokenizer
from halfsafe.prompts import HELDOUT, bundled_prompts

CALIBRATION = bundled_prompts()[:6]
HELD = bundled_prompts(HELDOUT)[:3]


def _tensors(directory: Path) -> dict:
    found = {}
    for path in sorted(directory.glob("*.safetensors")):
        found.update(load_file(str(path)))
    return found


def _config(directory: Path) -> dict:
    config = json.loads((directory / "config.json").read_text())
    config.pop("halfsafe")  # the verification numbers: greedy decoding is in-memory only
    return config


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3"])
def test_layerwise_observation_equals_the_in_memory_one(tiny_dirs, arch):
    path = tiny_dirs[arch, "residual"]
    loaded = load_model(str(path))
    expected = {s.name: s for s in observe(loaded.model, loaded.tokenizer, CALIBRATION).sites()}
    got = {s.name: s for s in observe_layerwise(LayerwiseModel(path), loaded.tokenizer, CALIBRATION)}
    assert got == expected  # every site: max, channel, position, prompt


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gemma3", "qwen3_moe"])
def test_layerwise_fix_writes_the_in_memory_checkpoint_bit_for_bit(tiny_dirs, tmp_path, arch):
    path = tiny_dirs[arch, "residual"]
    loaded = load_model(str(path))
    model, report = fix(loaded.model, loaded.tokenizer, calibration=CALIBRATION, heldout=HELD)
    export_checkpoint(model, loaded.tokenizer, tmp_path / "in-memory")
    layerwise = fix_layerwise(open_layerwise(path), loaded.tokenizer, tmp_path / "layerwise",
                              calibration=CALIBRATION, heldout=HELD)
    assert layerwise.plan == report.plan and report.plan.residual_scale < 1
    ours, theirs = _tensors(tmp_path / "layerwise"), _tensors(tmp_path / "in-memory")
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype == torch.float16 and torch.equal(ours[k], theirs[k]) for k in ours)
    assert _config(tmp_path / "layerwise") == _config(tmp_path / "in-memory")
    for name in ("fixed", "bfloat16"):  # the same teacher-forced numbers, computed layer by layer
        assert layerwise.fidelity[name].kl_mean == pytest.approx(report.fidelity[name].kl_mean, rel=1e-9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in-memory", "layerwise"]  # no work directory left
    reloaded = load_model(str(tmp_path / "layerwise"), dtype=torch.float16).model  # plain transformers
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert torch.isfinite(reloaded(input_ids=ids).logits).all()


def test_layerwise_diagnosis_matches_the_in_memory_verdicts(tiny_dirs):
    from halfsafe.diagnosing import diagnose

    path = tiny_dirs["gemma3_text", "residual"]
    loaded = load_model(str(path))
    expected = diagnose(loaded.model, loaded.tokenizer, CALIBRATION)
    got = diagnose_layerwise(LayerwiseModel(path), loaded.tokenizer, CALIBRATION)
    for ours, theirs in zip(got.verdicts, expected.verdicts, strict=True):
        assert (ours.status, ours.max_abs, ours.max_site, ours.nonfinite_prompts) == \
               (theirs.status, theirs.max_abs, theirs.max_site, theirs.nonfinite_prompts)
        assert (ours.first_nonfinite is None) == (theirs.first_nonfinite is None)
    assert got.target.first_nonfinite.startswith("model.layers.1.")
    assert got.layers == expected.layers


class _Interrupt(Exception):
    pass


def _counting(stop_at: int | None = None):
    calls = []

    def progress():
        calls.append(1)
        if stop_at is not None and len(calls) == stop_at:
            raise _Interrupt

    return progress, calls


@pytest.mark.parametrize("stop_at", [3, 10])  # during the observation; during the export
def test_an_interrupted_run_resumes_and_never_leaves_a_partial_output(tiny_dirs, tmp_path, stop_at):
    path = tiny_dirs["qwen3", "residual"]
    tokenizer = load_tokenizer(path)
    out = tmp_path / "fixed"
    layers = 4  # progress: 4 observation layers, 4 verification layers, 5 export units
    interrupted, _ = _counting(stop_at)
    with pytest.raises(_Interrupt):
        fix_layerwise(open_layerwise(path), tokenizer, out, calibration=CALIBRATION, heldout=HELD, progress=interrupted)
    assert not out.exists() and work_dir_for(out).is_dir()

    written = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
               for p in (work_dir_for(out) / "checkpoint").glob("*.safetensors")}
    if stop_at > 2 * layers:  # interrupted in the export, after at least one shard
        assert written

    resumed, calls = _counting()
    fix_layerwise(open_layerwise(path), tokenizer, out, calibration=CALIBRATION, heldout=HELD, progress=resumed)
    if stop_at <= layers:  # the observation restarts after its last completed layer
        assert len(calls) == (layers - stop_at) + layers + (layers + 1)  # the state is saved before progress
    else:  # the observation is not run again; the verification is, and the export counts every unit
        assert len(calls) == layers + (layers + 1)
    assert not work_dir_for(out).exists()
    # The shards finished before the interruption are the very files published (same inode, same
    # modification time): the resumed export did not write them again.
    assert {name: (out / name).stat().st_ino for name in written} == {n: w[0] for n, w in written.items()}
    assert {name: (out / name).stat().st_mtime_ns for name in written} == {n: w[1] for n, w in written.items()}

    fix_layerwise(open_layerwise(path), tokenizer, tmp_path / "clean", calibration=CALIBRATION, heldout=HELD)
    ours, clean = _tensors(out), _tensors(tmp_path / "clean")
    assert ours.keys() == clean.keys() and all(torch.equal(ours[k], clean[k]) for k in ours)


class _Payload:
    """Pickles to a call of os.mkdir: what a tampered resume state could run on load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.marker),)


def test_a_tampered_resume_state_is_refused_in_one_line_and_never_run(tiny_dirs, tmp_path):
    path = tiny_dirs["qwen3", "residual"]
    out, marker = tmp_path / "fixed", tmp_path / "ran"
    interrupted, _ = _counting(3)
    with pytest.raises(_Interrupt):
        fix_layerwise(open_layerwise(path), load_tokenizer(path), out, calibration=CALIBRATION, heldout=HELD,
                      progress=interrupted)
    state = work_dir_for(out) / "observe-state.pt"
    saved = torch.load(state, weights_only=True)
    torch.save({**saved, "payload": _Payload(marker)}, state)  # the same state, plus code

    with pytest.raises(HalfsafeError) as caught:
        fix_layerwise(open_layerwise(path), load_tokenizer(path), out, calibration=CALIBRATION, heldout=HELD)
    message = str(caught.value)
    assert not marker.exists() and not out.exists()  # refused before anything ran or was written
    assert message.startswith(f"the resume state {state} is not one halfsafe wrote (")
    assert message.endswith(f"delete {state.parent} to start over") and "\n" not in message


def test_a_rerun_with_other_settings_starts_over(tiny_dirs, tmp_path):
    path = tiny_dirs["qwen3", "residual"]
    tokenizer = load_tokenizer(path)
    out = tmp_path / "fixed"
    interrupted, _ = _counting(3)
    with pytest.raises(_Interrupt):
        fix_layerwise(open_layerwise(path), tokenizer, out, calibration=CALIBRATION, heldout=HELD, progress=interrupted)
    progress, calls = _counting()
    fix_layerwise(open_layerwise(path), tokenizer, out, calibration=CALIBRATION[:4], heldout=HELD, progress=progress)
    assert len(calls) == 4 + 4 + 5  # a full observation: the saved state was for other prompts


def _without_an_expert(source: Path, directory: Path) -> Path:
    """`source` with the last expert of layer 0 left out of its weights."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(source, directory, ignore=shutil.ignore_patterns("*.safetensors*"))
    tensors = _tensors(source)
    prefix = "model.layers.0.mlp.experts."  # one tensor per expert, as save_pretrained writes them
    last = max(int(k[len(prefix):].split(".")[0]) for k in tensors if k.startswith(prefix))
    kept = {k: v for k, v in tensors.items() if not k.startswith(f"{prefix}{last}.")}
    assert len(kept) < len(tensors)
    save_file(kept, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def test_layerwise_refusals_are_one_clear_line(tiny_dirs, tmp_path):
    with pytest.raises(HalfsafeError, match=r"makes model.layers.0.mlp.experts.\w+ of shape \[3, \d+, \d+\] from "
                       r".* config.json says \[4, \d+, \d+\]; .* use a complete checkpoint$"):
        observe_layerwise(LayerwiseModel(_without_an_expert(tiny_dirs["qwen3_moe", None], tmp_path / "moe")),
                          load_tokenizer(tiny_dirs["qwen3_moe", None]), CALIBRATION[:1])
    with pytest.raises(HalfsafeError,
                       match=r"largest unit \(layer 0\) needs 144.5 KiB in fp32, above --max-memory 1000 B"):
        open_layerwise(tiny_dirs["llama", None], max_memory=parse_memory("1KB"))
    assert parse_memory("7.5GiB") == int(7.5 * 2**30) and parse_memory("500MB") == 500 * 10**6
    with pytest.raises(HalfsafeError, match="'8XB' is not a size"):
        parse_memory("8XB")


def _fix_cli(tiny_dirs, tmp_path, *args):
    return main(["fix", str(tiny_dirs["llama", "residual"]), "--out", str(tmp_path / "out"), "--prompts",
                 str(tmp_path / "p.txt"), "--heldout", str(tmp_path / "p.txt"), *args])


def test_fix_layerwise_command(tiny_dirs, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("The capital of France is\ndef add(a, b):\n", encoding="utf-8")
    assert _fix_cli(tiny_dirs, tmp_path, "--layerwise", "--max-memory", "1GB", "--device", "cpu") == 0
    out = capsys.readouterr().out
    assert "layer-wise: 4 layers; the largest unit" in out and "fixed checkpoint written to" in out
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float16"


@pytest.mark.parametrize("args, message", [
    (["--max-memory", "1GB"], "--max-memory applies to --layerwise"),
    (["--layerwise", "--device-map", "auto"], "with --layerwise use --device"),
    (["--layerwise", "--max-memory", "1KB"], "raise --max-memory"),
    (["--layerwise", "--max-memory", "lots"], "'lots' is not a size"),
])
def test_fix_layerwise_bad_inputs(tiny_dirs, tmp_path, capsys, args, message):
    (tmp_path / "p.txt").write_text("The capital of France is\n", encoding="utf-8")
    assert _fix_cli(tiny_dirs, tmp_path, *args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "out").exists() and not work_dir_for(tmp_path / "out").exists()


def test_fix_layerwise_refuses_a_disk_without_room_for_the_output(tiny_dirs, tmp_path, capsys, monkeypatch):
    import shutil

    from halfsafe.layerwise import jobs

    (tmp_path / "p.txt").write_text("The capital of France is\n", encoding="utf-8")
    lm = LayerwiseModel(tiny_dirs["llama", "residual"])
    size = sum(lm.unit_bytes(u) for u in ["outside the layers", *range(lm.num_layers)]) // 2  # float16
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(jobs.shutil, "disk_usage", lambda path: usage._replace(free=size - 1))
    assert _fix_cli(tiny_dirs, tmp_path, "--layerwise", "--device", "cpu") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "needs" in lines[0] and "free for the float16 checkpoint" in lines[0], lines
    assert "free some space or choose --out on another disk" in lines[0]
    assert not (tmp_path / "out").exists() and not work_dir_for(tmp_path / "out").exists()
    # The shards a resumable run already wrote count as done: with them there, the same free space is enough.
    shards = work_dir_for(tmp_path / "out") / "checkpoint"
    shards.mkdir(parents=True)
    (shards / "model-00001-of-00002.safetensors").write_bytes(b"0" * 64)
    jobs.check_free_disk(lm, (tmp_path / "out").resolve(), torch.float16)


def test_device_map_loads_the_in_memory_path(tiny_dirs, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("The capital of France is\n", encoding="utf-8")
    code = main(["diagnose", str(tiny_dirs["llama", "residual"]), "--prompts", str(tmp_path / "p.txt"),
                 "--device-map", "cpu"])
    assert code == 0 and "float16: UNSAFE" in capsys.readouterr().out


# -- memory ---------------------------------------------------------------------------------------

_RUN = textwrap.dedent("""
    import resource, sys
    from pathlib import Path
    from halfsafe.cli.session import quiet_transformers
    quiet_transformers()
    source, out, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    # The code both paths import (transformers' model classes) is not what is measured.
    import halfsafe.fixing.export, halfsafe.fixing.fix, halfsafe.layerwise.jobs, halfsafe.model.loading
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.llama import modeling_llama
    prompts = dict(calibration=["The capital of France is", "def add(a, b):"], heldout=["1 + 1 = 2", "Hello"])
    statm = lambda: int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
    if mode == "layerwise":
        from halfsafe.layerwise.jobs import fix_layerwise, open_layerwise
        from halfsafe.model.loading import load_tokenizer
        before = statm()
        fix_layerwise(open_layerwise(source), load_tokenizer(source), out, **prompts)
    else:
        from halfsafe.fixing.export import export_checkpoint
        from halfsafe.fixing.fix import fix
        from halfsafe.model.loading import load_model
        before = statm()
        loaded = load_model(str(source))
        model, _ = fix(loaded.model, loaded.tokenizer, **prompts)
        export_checkpoint(model, loaded.tokenizer, out)
    # VmHWM, not ru_maxrss: the latter keeps the parent's resident size from before the exec.
    peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(before, peak)
""")


def _peak_extra(source: Path, out: Path, mode: str) -> int:
    """Peak resident memory of a fresh process doing the job, above what it held before it."""
    done = subprocess.run([sys.executable, "-c", _RUN, str(source), str(out), mode], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    before, peak = map(int, done.stdout.split())
    print(mode, before >> 20, peak >> 20)
    return peak - before


def test_a_model_several_times_the_cap_is_fixed_under_it_with_the_in_memory_result(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.support.models import BOS, EOS, PAD, VOCAB, byte_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=1024, intermediate_size=4096, num_hidden_layers=16,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                         pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False)
    source = tmp_path / "source"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    size = sum(p.numel() * 4 for p in model.parameters())  # ~1.1 GB in fp32
    model.save_pretrained(str(source))
    byte_tokenizer().save_pretrained(str(source))
    del model
    cap = size // 4

    layerwise = _peak_extra(source, tmp_path / "layerwise", "layerwise")
    in_memory = _peak_extra(source, tmp_path / "in-memory", "in-memory")
    assert layerwise < cap < in_memory, (layerwise, cap, in_memory)
    ours, theirs = _tensors(tmp_path / "layerwise"), _tensors(tmp_path / "in-memory")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


# Types beyond the hand-written reference, each exercising another part of the derived roles: OLMo 2 (linear
# readers compensated by 1/s), Phi-3 (fused qkv and gate_up), GLM-4 (post-sublayer norms),
# GPT-NeoX (parallel attention and MLP), StarCoder 2 (LayerNorm with biases).
NEW_TYPES = ["olmo2", "phi3", "glm4", "gpt_neox", "starcoder2"]


def _layerwise_and_in_memory(source: Path, tmp_path: Path) -> tuple[dict, dict]:
    """Observe and fix `source` both ways; the observation and plan must be equal. Returns the
    exported tensors, layer-wise and in-memory."""
    loaded = load_model(str(source))
    expected = {s.name: s for s in observe(loaded.model, loaded.tokenizer, CALIBRATION[:3]).sites()}
    assert {s.name: s for s in observe_layerwise(LayerwiseModel(source), loaded.tokenizer, CALIBRATION[:3])} == expected
    fixed, report = fix(loaded.model, loaded.tokenizer, calibration=CALIBRATION[:3], heldout=HELD[:2])
    export_checkpoint(fixed, loaded.tokenizer, tmp_path / "in-memory")
    layerwise = fix_layerwise(open_layerwise(source), loaded.tokenizer, tmp_path / "layerwise",
                              calibration=CALIBRATION[:3], heldout=HELD[:2])
    assert layerwise.plan == report.plan and report.plan.residual_scale < 1
    assert _config(tmp_path / "layerwise") == _config(tmp_path / "in-memory")
    return _tensors(tmp_path / "layerwise"), _tensors(tmp_path / "in-memory")


def _planted_source(model_type: str, directory: Path, **save) -> Path:
    from halfsafe.model.layers import find_decoder_layers
    from halfsafe.roles import derive_roles
    from tests.support.models import VOCAB, byte_tokenizer
    from tests.support.planted import plant_massive_activation, tiny_model

    model = tiny_model(model_type, vocab_size=VOCAB)
    path, layers = find_decoder_layers(model)
    assert plant_massive_activation(model, layers, path, derive_roles(model)) > 65504
    model.save_pretrained(str(directory), **save)
    byte_tokenizer().save_pretrained(str(directory))
    return directory


@pytest.mark.parametrize("model_type", NEW_TYPES)
def test_layerwise_equals_in_memory_on_types_never_written_by_hand(tmp_path, model_type):
    """Layer-wise roles come from a narrow stand-in of the config: the observation, plan and
    every exported tensor equal the in-memory fix's, whose roles come from the model itself."""
    ours, theirs = _layerwise_and_in_memory(_planted_source(model_type, tmp_path / "source"), tmp_path)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


# Mixtral as `save_pretrained` writes it, one tensor per expert (`block_sparse_moe.experts.N.w1`,
# `w2`, `w3`: the original release's layout, which transformers stacks into `mlp.experts.gate_up_proj`
# and `down_proj` when loading), and as the model holds it (`save_original_format=False`).
@pytest.mark.parametrize("original_format", [True, False], ids=["per-expert", "stacked"])
def test_layerwise_reads_and_writes_the_layouts_transformers_converts(tmp_path, original_format):
    """Each layer's experts are read through transformers' conversion, scaled as one stacked
    tensor, and written back in the layout the in-memory export writes: that of the source."""
    source = _planted_source("mixtral", tmp_path / "source", save_original_format=original_format)
    ours, theirs = _layerwise_and_in_memory(source, tmp_path)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    stored = _tensors(source)
    assert ours.keys() == stored.keys()
    assert any(".experts.0.w2." in k for k in ours) == original_format
    experts = [k for k in ours if ".experts." in k]
    assert experts and any(not torch.equal(ours[k], stored[k].half()) for k in experts)  # the scale reached them
