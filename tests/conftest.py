"""Shared fixtures. Keep this small: only what several test files need."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# The config.json facts of Qwen/Qwen3-32B (copied by hand from the HF config, not from the code).
QWEN3_32B_HF_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 5120,
    "intermediate_size": 25600,
    "num_hidden_layers": 64,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "torch_dtype": "bfloat16",
}

# What a vLLM-Ascend W8A8 release ships next to config.json (abridged).
W8A8_DESCRIPTION: dict[str, str] = {
    "model_quant_type": "W8A8",
    "model.embed_tokens.weight": "FLOAT",
    "model.layers.0.self_attn.q_proj.weight": "W8A8",
    "model.layers.0.mlp.down_proj.weight": "W8A8",
    "lm_head.weight": "FLOAT",
}

MakeModelDir = Callable[..., Path]


@pytest.fixture
def hf_config() -> dict[str, Any]:
    """A fresh copy of the Qwen3-32B config.json facts."""
    return dict(QWEN3_32B_HF_CONFIG)


@pytest.fixture
def w8a8_description() -> dict[str, str]:
    return dict(W8A8_DESCRIPTION)


@pytest.fixture
def make_model_dir(tmp_path: Path) -> MakeModelDir:
    """Factory for a Hugging Face style model directory under tmp_path."""

    def make(
        name: str = "Qwen3-32B-local",
        config: dict[str, Any] | None = QWEN3_32B_HF_CONFIG,
        description: dict[str, str] | None = None,
    ) -> Path:
        d = tmp_path / name
        d.mkdir()
        if config is not None:
            (d / "config.json").write_text(json.dumps(config))
        if description is not None:
            (d / "quant_model_description.json").write_text(json.dumps(description))
        return d

    return make


@pytest.fixture(scope="session")
def real_vllm() -> Any:
    """The real-vLLM environment (tests/real_vllm.py): skipped only where it cannot be built,
    and never under CI=true, where a missing environment fails the test."""
    from real_vllm import locate

    found = locate()
    if isinstance(found, str):
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"real vLLM required in CI: {found}")
        pytest.skip(f"no real vLLM: {found}")
    return found
