"""`diagnose --layerwise` and `fix --layerwise`: the in-memory jobs, one layer at a time.

The pipeline's stages (`pipeline.run`) on the `Layerwise` backend: the same roles (derived on a
narrow stand-in of the config, `roles.standin`), exactness gate, observation, plan, gate and
checkpoint as the in-memory path, with memory bounded by the largest unit. The work directory
beside `--out` holds the observation state and the shards as
they are written; a rerun with the same settings resumes, a rerun with other settings starts
over. `--out` appears only when everything is written.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from .. import __version__
from ..diagnosing import AT_RISK_MARGIN
from ..dtypes import dtype_name, format_bytes, parse_dtype
from ..errors import HalfsafeError
from ..fixing.plan import PLANNING_MARGIN
from ..prompts import CALIBRATION, HELDOUT, bundled_prompts
from .skeleton import OUTER, LayerwiseModel, release_memory
from .sweep import confirm_layerwise, observe_layerwise, verify_layerwise

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> int:
    """'8GB', '7.5GiB', '500MB' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise HalfsafeError(f"--max-memory '{text}' is not a size; write e.g. 8GB, 7.5GiB or 500MB")
    return int(float(match.group(1)) * _UNITS[unit])


def open_layerwise(path: Path, *, device="cpu", max_memory: int | None = None, **kwargs) -> LayerwiseModel:
    """The skeleton of the checkpoint at `path`, refused if its largest unit exceeds `max_memory`."""
    lm = LayerwiseModel(path, device=device, **kwargs)
    if max_memory is not None:
        unit, size = lm.largest_unit()
        if size > max_memory:
            raise HalfsafeError(
                f"the largest unit ({unit}) needs {format_bytes(size)} in fp32, above --max-memory "
                f"{format_bytes(max_memory)}; layer-wise mode holds one unit at a time, so raise --max-memory"
            )
    return lm


# -- diagnose ---------------------------------------------------------------------------------


def diagnose_layerwise(lm: LayerwiseModel, tokenizer, prompts: list[str], *, dtype=torch.float16,
                       also=(torch.bfloat16,), margin: float = AT_RISK_MARGIN, name: str | None = None, progress=None):
    """`diagnose`, one layer at a time. The confirmation in each dtype runs layer by layer too;
    no greedy continuation is generated (that needs the whole model at every token)."""
    from ..diagnosing import assemble_diagnosis

    sites = observe_layerwise(lm, tokenizer, prompts, progress=progress)
    confirmations = {d: confirm_layerwise(lm, tokenizer, prompts, d, progress=progress)
                     for d in (dtype, *[d for d in also if d != dtype])}
    attn = lm.model.config._attn_implementation or "eager"
    return assemble_diagnosis(sites, confirmations, dtype=dtype, margin=margin, attn_implementation=attn,
                              num_layers=lm.num_layers, num_prompts=len(prompts),
                              model_name=name or str(lm.path), architecture=type(lm.model).__name__,
                              reference_continuation="", notes=["layer-wise: no greedy continuation was generated"])


# -- fix --------------------------------------------------------------------------------------


def work_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.halfsafe-partial"


class Layerwise:
    """The pipeline's backend for a model streamed from disk, one unit at a time.

    Roles, the exactness gate and the sites' roles run on a narrow stand-in built from the
    checkpoint's config (same depth, layer kinds and parameter names; random weights, a few MB):
    roles name parameters and eps, never widths or values, so they are the model's own (the
    tests check that layer-wise and in-memory give the same plan and shards). The probes are the
    stand-in's own token ids (its vocabulary is shrunk), not the calibration prompts.
    """

    reloads_bounded = False  # a bounded export's reload gate runs the whole model

    def __init__(self, lm: LayerwiseModel, tokenizer, work: Path, out: Path, progress=None):
        self.lm, self.tokenizer, self.work, self.out, self.progress = lm, tokenizer, work, out, progress
        self.model = lm.model
        self._standin = None

    def _stand_in(self):
        from ..roles.standin import standin_model

        if self._standin is None:
            self._standin = standin_model(self.model.config)
        return self._standin

    def roles(self):
        from ..roles.standin import roles_of_standin

        return roles_of_standin(self._stand_in(), {n for n, _ in self.model.named_parameters()})

    def prove(self, roles, prompts: list[str]):
        from ..roles import exactness_gate
        from ..roles.deriving import default_probe_ids

        model = self._stand_in()
        return exactness_gate(model, roles, [default_probe_ids(model, 16), default_probe_ids(model, 7)])

    def site_roles(self, roles, prompt: str):
        from ..roles import output_exponents
        from ..roles.deriving import default_probe_ids

        model = self._stand_in()
        return roles.site_roles(output_exponents(model, roles, default_probe_ids(model)))

    def observe(self, prompts: list[str], progress=None):
        return observe_layerwise(self.lm, self.tokenizer, prompts, state_dir=self.work, progress=progress)

    def verify(self, prompts: list[str], fix, dtype: torch.dtype, progress=None) -> dict:
        return verify_layerwise(self.lm, self.tokenizer, prompts, fix.scales(), fix.settings(self.model), fix.plan,
                                dtype, progress=progress)

    def speed_ratio(self, fix, dtype: torch.dtype, prompt: str) -> float:
        raise HalfsafeError("--layerwise writes a rescaled checkpoint; it does not combine with --strategy keep-fp32")

    def reload_gate(self, fix, prompts: list[str], dtype: torch.dtype):
        raise HalfsafeError("a bounded export needs the whole model in memory; drop --layerwise to export it bounded")

    def commit(self, fix, dtype: torch.dtype, report) -> None:
        export_layerwise(self.lm, fix, dtype, report, self.tokenizer, self.work, self.out, progress=self.progress)


def fix_layerwise(lm: LayerwiseModel, tokenizer, out: str | Path, *, dtype=torch.float16,
                  margin: float = PLANNING_MARGIN, calibration: list[str] | None = None,
                  heldout: list[str] | None = None, max_kl: float | None = None, verify: bool = True,
                  overwrite: bool = False, progress=None):
    """Observe, plan, verify and export `lm` for `dtype`, one unit at a time; returns the report.

    Raises VerificationFailed (nothing written, the work directory removed) when a gate fails.
    """
    from ..fixing.export import check_export_target
    from ..fixing.gate import VerificationFailed
    from ..fixing.pipeline import run

    dtype = parse_dtype(dtype)
    out = check_export_target(out, overwrite=overwrite, source=lm.path)
    check_free_disk(lm, out, dtype)
    calibration = calibration or bundled_prompts(CALIBRATION)
    heldout = heldout or bundled_prompts(HELDOUT)
    work = _open_work_dir(out, {
        "version": __version__, "source": str(lm.path.resolve()), "weights": lm.checkpoint.fingerprint(),
        "dtype": dtype_name(dtype), "margin": margin, "calibration": calibration,
        "heldout": heldout if verify else None, "max_kl": max_kl,
    })
    backend = Layerwise(lm, tokenizer, work, out, progress)
    try:
        return run(backend, dtype=dtype, strategy="rescale", margin=margin, calibration=calibration, heldout=heldout,
                   max_kl=max_kl, verify=verify, for_export=True, progress=progress)
    except VerificationFailed:
        shutil.rmtree(work, ignore_errors=True)
        raise


def check_free_disk(lm: LayerwiseModel, out: Path, dtype: torch.dtype) -> None:
    """Refuse, before any work, an `out` whose disk cannot take the fixed checkpoint (the format
    says its size: dense, every parameter in `dtype`; quantized, the input's shards), less the
    shards a resumable run already wrote beside it (kept when it resumes, removed when it starts
    over: either way that much less is needed)."""
    fp32 = sum(lm.unit_bytes(unit) for unit in [OUTER, *range(lm.num_layers)])
    size = lm.weights_format.output_bytes(fp32, dtype)
    written = work_dir_for(out) / "checkpoint"
    done = sum(f.stat().st_size for f in written.glob("*.safetensors")) if written.is_dir() else 0
    need, free = max(0, size - done), shutil.disk_usage(out.parent).free
    if need > free:
        raise HalfsafeError(
            f"--out '{out}' needs {format_bytes(need)} free for the {dtype_name(dtype)} checkpoint, and its disk has "
            f"{format_bytes(free)}; free some space or choose --out on another disk"
        )


def export_layerwise(lm: LayerwiseModel, fix, dtype: torch.dtype, report, tokenizer, work: Path, out: Path,
                     *, progress=None) -> Path:
    """The fixed checkpoint written one unit at a time by the checkpoint's weight format
    (`formats`: `streamed_writer`): dense, one shard per unit in `dtype`, as `save_pretrained` writes
    the in-memory model; quantized, the input's shards with each unit's rescaled tensors written in.
    Then `pipeline.finalise` (eps, dtype, `halfsafe` block), the format's config and other files,
    and the rename to `out`."""
    from ..fixing.export import publish
    from ..fixing.pipeline import finalise

    target = work / "checkpoint"
    target.mkdir(exist_ok=True)
    writer = lm.weights_format.streamed_writer(lm, fix.scales(), dtype)
    writer.start(target)
    # One unit per layer; outside the layers one per tensor (an embedding can take gigabytes), or
    # per set of tensors that transformers converts together.
    outer = lm.layout.together(lm.unit_names(OUTER))
    groups = outer + [lm.unit_names(i) for i in range(lm.num_layers)]
    for k, names in enumerate(groups):
        writer.unit(target, k, len(groups), names)
        release_memory(lm.device)
        if progress is not None and k >= len(outer) - 1:  # once outside the layers, then once per layer
            progress()
    finalise(lm.model, fix, dtype, report)
    writer.finish(target, lm.model, tokenizer)
    publish(target, out, source=lm.path)
    shutil.rmtree(work, ignore_errors=True)
    return out


def _open_work_dir(out: Path, settings: dict) -> Path:
    """The work directory beside `out`: reused when it holds a run with the same settings,
    emptied otherwise."""
    work = work_dir_for(out)
    marker = work / "run.json"
    if work.exists():
        try:
            same = json.loads(marker.read_text()) == settings
        except (OSError, ValueError):
            same = False
        if not same:
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(settings))
    return work
