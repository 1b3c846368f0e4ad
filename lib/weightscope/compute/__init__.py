"""Stage 4, computation: streaming metric kernels on tensors (token scores, attention reads, populations)."""
