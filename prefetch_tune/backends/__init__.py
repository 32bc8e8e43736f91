"""Backends that produce measurements: the vLLM server process and the benchmark client."""
