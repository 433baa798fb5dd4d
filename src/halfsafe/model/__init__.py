"""The model as halfsafe meets it: loading (directory, hub id, GGUF, demo), hooks with one owner,
running in another precision, and the per-architecture cross-check data."""
