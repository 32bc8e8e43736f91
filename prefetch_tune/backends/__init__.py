"""Backends that produce measurements: the built-in model (`sim`) and real runs (`vllm`: the
server process and the benchmark client), behind one protocol (`base`)."""
