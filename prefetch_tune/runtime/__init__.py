"""The prefetch runtime: the pure plan (`plan.py`) and the vLLM plugin that executes it."""
