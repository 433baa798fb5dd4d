"""The fix, stage by stage: observe -> plan -> apply -> prove -> verify -> gate -> export.

`pipeline` runs the stages in that order on a backend (in memory, or layer by layer from disk,
`halfsafe.layerwise`) with a strategy (rescale, keep-fp32); `fix` is its in-memory entry point.
"""
