"""prefetch-tune: find, apply and re-check vLLM-Ascend weight-prefetch ratios."""

from __future__ import annotations

__version__ = "0.1.0"
