"""Layer-wise: observe, verify and export a model one decoder layer at a time, from disk.

For models larger than memory (a 7B model is 28 GB in fp32), as the field's calibration tools
do it (llm-compressor's sequential pipeline, GPTQ's layer loop): memory is the largest *unit*
in fp32 (one decoder layer, or the parts outside the layers: embedding, final norm, output
embedding) plus the prompts' hidden states between layers; time grows linearly with depth.

How it works, with nothing model-specific:
- the model is a *skeleton*: transformers builds it from its config with parameters on the
  meta device (no memory) and buffers real (rotary frequencies are computed, not stored);
- a unit is *materialised* by reading its tensors from the safetensors files (memory-mapped,
  one tensor at a time; several stored tensors that make one parameter, such as one per expert,
  through transformers' own conversion; a quantized weight through the checkpoint's weight
  format, `formats`, dequantized from its own stored tensors) into the skeleton's parameters,
  and put back on meta afterwards;
- the model's own forward prepares each layer's inputs: with the layers replaced by stand-ins
  that record their arguments and pass the hidden state through, one forward per prompt gives
  every layer's attention mask, rotary embeddings and positions, exactly as the model makes
  them (the *capture* pass). The same stand-ins, returning the last layer's real output, let
  the model's own code finish: final norm, output embedding, logit softcapping (the *tail*);
- between the two, each real layer runs alone on every prompt's hidden state.
The observation hooks are the in-memory ones, so the statistics, the plan and the exported
weights are the same as the in-memory path's (the tests check it bit for bit).

The export is the weight format's (`streamed_writer`), one unit at a time: dense, one shard per
unit in the target dtype; quantized, the input's shards copied and each unit's rescaled tensors
written over their bytes, so the packed integers are the input's.

Resumable: the work happens in a directory beside the output (`.NAME.halfsafe-partial`); the
observation saves its state after every layer and the export records every unit it finishes
(a dense shard is written atomically; a quantized unit's bytes are computed from the input, so
writing them again gives the same), so a rerun with the same settings continues where the last
one stopped. The output directory appears only at the end, by a rename.
"""

from .checkpoint import Checkpoint
from .jobs import diagnose_layerwise, fix_layerwise, open_layerwise, parse_memory, work_dir_for
from .skeleton import FINAL, INPUT, OUTER, LayerwiseModel, release_memory
from .sweep import confirm_layerwise, observe_layerwise, verify_layerwise

__all__ = [
    "FINAL", "INPUT", "OUTER", "Checkpoint", "LayerwiseModel", "confirm_layerwise", "diagnose_layerwise",
    "fix_layerwise", "observe_layerwise", "open_layerwise", "parse_memory", "release_memory", "verify_layerwise",
    "work_dir_for",
]
