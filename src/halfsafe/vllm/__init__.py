"""halfsafe inside vLLM: a general plugin that lets fixed checkpoints run in float16, a V1 logits
processor that keeps sampling from emitting garbage, and the counter it reports to /metrics."""
