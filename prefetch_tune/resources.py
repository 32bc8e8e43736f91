"""Where the shipped `configs/` live: inside the wheel, or at the top of a source checkout."""

from __future__ import annotations

from pathlib import Path


def configs_dir() -> Path:
    """`prefetch_tune/configs` when installed from a wheel, else the checkout's `configs/`."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("prefetch-tune's configs/ directory is missing from this install")
