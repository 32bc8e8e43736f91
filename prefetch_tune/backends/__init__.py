"""Backends that produce measurements, behind one protocol (`base`): the built-in performance
model (`sim`) and real runs (`vllm`, which drives a `vllm serve` process group from `server` and
the `vllm bench serve` client from `bench`)."""
