"""vLLM general plugin: float16 for checkpoints that halfsafe fixed and verified, nothing else.

vLLM refuses float16 for model types whose weights overflow it (`_FLOAT16_NOT_SUPPORTED_MODELS`
in vllm/config/model.py, raised by `_check_valid_dtype`, and filtered out of `dtype="auto"` by
`_is_valid_dtype`). A checkpoint exported by `halfsafe fix` no longer overflows, and its config
says so: the `halfsafe` block holds the plan and the verification against float32. While vLLM
resolves the dtype of such a checkpoint (`_get_and_verify_dtype`, called in every process that
builds a model config), both checks let float16 through; for every other checkpoint they are
vLLM's own functions, unchanged, with vLLM's own message.

vLLM calls `register` in each of its processes (front end, engine core, workers) through the
`vllm.general_plugins` entry point, possibly more than once per process.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging

import torch

logger = logging.getLogger("halfsafe.vllm")

# What this plugin needs from vllm.config.model; if any moved, it changes nothing.
NEEDED = ("_get_and_verify_dtype", "_is_valid_dtype", "_check_valid_dtype")
_MARK = "__halfsafe_wrapped__"
_lifted = contextvars.ContextVar("halfsafe_float16_lifted", default=False)


def register() -> None:
    """Entry point of the `vllm.general_plugins` group."""
    from .metrics import install_collector

    _lift_float16_for_fixed()
    install_collector()


def verified_for_float16(config) -> bool:
    """True when `config` (a transformers config or its dict) carries a `halfsafe` block written by
    `fix` with the rescale strategy for float16, whose verification passed its own gate and whose
    `exactness.exact` is recorded: true, or false for a bounded export (one eps per config field,
    its fp32 delta measured), which also needs its bound passed (`exactness.bounded.passed`). A
    missing key is not proven, never a yes."""
    block = config.get("halfsafe") if isinstance(config, dict) else getattr(config, "halfsafe", None)
    if not isinstance(block, dict):
        return False
    # keep-fp32 needs halfsafe's hooks at run time: vLLM would run those layers in float16.
    if block.get("strategy") != "rescale" or (block.get("plan") or {}).get("dtype") != "float16":
        return False
    verification = block.get("verification") or {}
    fixed, bound = verification.get("fixed"), verification.get("max_kl")
    if not isinstance(fixed, dict) or not isinstance(bound, (int, float)):
        return False  # exported with --no-verify
    # Fail closed: a block without `exactness`, or without its `exact`, is not proven. A bounded
    # export (exact: false) passed its own bound too, or `fix` would not have written it; a block
    # that says otherwise was not written by a passing `fix`.
    exactness = block.get("exactness")
    if not isinstance(exactness, dict) or exactness.get("exact") not in (True, False):
        return False
    if exactness["exact"] is False and (exactness.get("bounded") or {}).get("passed") is not True:
        return False
    try:
        return fixed["nonfinite_share"] == 0 and fixed["kl_mean"] <= bound
    except (KeyError, TypeError):
        return False


def _lift_float16_for_fixed() -> None:
    try:
        import vllm.config.model as model_module

        import vllm
    except Exception as exc:  # noqa: BLE001 - a broken vLLM must not break anything else
        logger.warning("halfsafe: vllm.config.model could not be imported (%s); fixed checkpoints stay "
                       "refused in float16", exc)
        return
    version = getattr(vllm, "__version__", "unknown")
    missing = [name for name in NEEDED if not callable(getattr(model_module, name, None))]
    resolve = getattr(model_module, "_get_and_verify_dtype", None)
    if not missing and "config" not in inspect.signature(resolve).parameters:
        missing.append("_get_and_verify_dtype(config=...)")
    if missing:
        logger.warning("halfsafe: vLLM %s has no vllm.config.model.%s; halfsafe's plugin changes nothing "
                       "(fixed checkpoints stay refused in float16)", version, ", ".join(missing))
        return
    if getattr(resolve, _MARK, False):
        return  # already registered in this process
    signature = inspect.signature(resolve)

    @functools.wraps(resolve)
    def get_and_verify_dtype(*args, **kwargs):
        config = signature.bind_partial(*args, **kwargs).arguments.get("config")
        if not verified_for_float16(config):
            return resolve(*args, **kwargs)
        token = _lifted.set(True)
        try:
            return resolve(*args, **kwargs)
        finally:
            _lifted.reset(token)

    setattr(get_and_verify_dtype, _MARK, True)
    model_module._is_valid_dtype = _lifting(model_module._is_valid_dtype)
    model_module._check_valid_dtype = _lifting(model_module._check_valid_dtype)
    model_module._get_and_verify_dtype = get_and_verify_dtype


def _lifting(check):
    """`check(model_type, dtype)`, except that float16 is valid while a verified checkpoint's
    dtype is being resolved."""

    @functools.wraps(check)
    def wrapper(model_type, dtype, *args, **kwargs):
        if _lifted.get() and dtype == torch.float16:
            return True
        return check(model_type, dtype, *args, **kwargs)

    return wrapper
