"""Model specs and parallel layouts: the per-rank bytes of every prefetchable weight.

A ModelSpec comes from a local Hugging Face model directory (its `config.json`, plus the
quantization description vLLM-Ascend's W8A8 releases ship) or from the built-in catalog in
`configs/models/`, which holds the same config.json facts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prefetch_tune.errors import ConfigError
from prefetch_tune.resources import configs_dir

Quant = Literal["w8a8", "bf16"]
QUANTS: tuple[Quant, ...] = ("w8a8", "bf16")
BYTES_PER_WEIGHT: dict[Quant, int] = {"w8a8": 1, "bf16": 2}
MiB = 1024 * 1024

# The prefetchable weights of one decoder layer, as vLLM-Ascend names them.
WEIGHTS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "experts.w13", "experts.w2")


@dataclass(frozen=True)
class Layout:
    """How the model is spread: tensor parallel, data parallel, expert parallel on or off."""

    tp: int = 1
    dp: int = 1
    ep: bool = False

    @property
    def ep_size(self) -> int:
        return self.tp * self.dp if self.ep else 1

    def label(self) -> str:
        return f"tp{self.tp}-dp{self.dp}" + ("-ep" if self.ep else "")


@dataclass(frozen=True)
class ModelSpec:
    """The config.json facts that decide weight bytes, plus quantization and provenance."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    quant: Quant = "w8a8"
    experts: int = 0
    experts_per_token: int = 0
    moe_intermediate: int = 0
    source: str = "catalog"

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    @property
    def bytes_per_weight(self) -> int:
        return BYTES_PER_WEIGHT[self.quant]

    def with_quant(self, quant: Quant) -> ModelSpec:
        return ModelSpec(**{**self.__dict__, "quant": quant})

    def check_layout(self, layout: Layout) -> None:
        """Raise ConfigError when the layout cannot shard this model."""
        if layout.tp < 1 or layout.dp < 1:
            raise ConfigError(f"--tp/--dp must be >= 1 (got tp {layout.tp}, dp {layout.dp})")
        if self.heads % layout.tp:
            raise ConfigError(
                f"--tp {layout.tp} does not divide the {self.heads} attention heads of {self.name}"
            )
        if self.kv_heads % layout.tp and layout.tp % self.kv_heads:
            raise ConfigError(
                f"--tp {layout.tp} neither divides nor is a multiple of the "
                f"{self.kv_heads} KV heads of {self.name}"
            )
        if not self.is_moe and self.intermediate % layout.tp:
            raise ConfigError(
                f"--tp {layout.tp} does not divide the intermediate size "
                f"{self.intermediate} of {self.name}"
            )
        if self.is_moe:
            if layout.ep and self.experts % layout.ep_size:
                raise ConfigError(
                    f"expert parallel size {layout.ep_size} (tp x dp) does not "
                    f"divide the {self.experts} experts of {self.name}"
                )
            if not layout.ep and self.moe_intermediate % layout.tp:
                raise ConfigError(
                    f"--tp {layout.tp} does not divide the expert intermediate "
                    f"size {self.moe_intermediate} of {self.name}"
                )
        elif layout.ep:
            raise ConfigError(f"--ep: {self.name} is a dense model and has no experts")

    def heads_per_rank(self, layout: Layout) -> int:
        return self.heads // layout.tp

    def kv_heads_per_rank(self, layout: Layout) -> int:
        """KV heads are split while there are enough, else replicated (one per rank)."""
        return max(1, self.kv_heads // layout.tp)

    def local_experts(self, layout: Layout) -> int:
        return self.experts // layout.ep_size if self.is_moe else 0

    def expert_intermediate_per_rank(self, layout: Layout) -> int:
        return self.moe_intermediate if layout.ep else self.moe_intermediate // layout.tp

    def weight_bytes(self, layout: Layout) -> dict[str, int]:
        """Per-rank bytes of each prefetchable weight of one decoder layer."""
        self.check_layout(layout)
        b = self.bytes_per_weight
        q_width = self.heads_per_rank(layout) * self.head_dim
        kv_width = self.kv_heads_per_rank(layout) * self.head_dim
        out = {
            "qkv_proj": self.hidden * (q_width + 2 * kv_width) * b,
            "o_proj": q_width * self.hidden * b,
        }
        if self.is_moe:
            e_local = self.local_experts(layout)
            inter = self.expert_intermediate_per_rank(layout)
            out["experts.w13"] = e_local * 2 * inter * self.hidden * b
            out["experts.w2"] = e_local * inter * self.hidden * b
        else:
            inter = self.intermediate // layout.tp
            out["gate_up_proj"] = self.hidden * 2 * inter * b
            out["down_proj"] = inter * self.hidden * b
        return out

    def rank_weight_bytes(self, layout: Layout) -> int:
        """Per-rank bytes of every weight the rank holds: all decoder layers, the MoE router,
        the embedding and lm_head (bf16, vocab-parallel over TP in vLLM). Norms are negligible."""
        per_layer = sum(self.weight_bytes(layout).values())
        if self.is_moe:
            per_layer += self.hidden * self.experts * 2  # router gate, bf16, replicated
        vocab = 2 * self.vocab * self.hidden * 2 // layout.tp  # embedding + lm_head, bf16
        return per_layer * self.layers + vocab

    def kv_bytes_per_token(self, layout: Layout) -> int:
        """Per-rank KV-cache bytes of one token over all layers (K and V, bf16)."""
        return self.layers * 2 * self.kv_heads_per_rank(layout) * self.head_dim * 2

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layers": self.layers,
            "hidden": self.hidden,
            "intermediate": self.intermediate,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "experts": self.experts,
            "experts_per_token": self.experts_per_token,
            "moe_intermediate": self.moe_intermediate,
            "quant": self.quant,
            "source": self.source,
        }


def _require(cfg: dict[str, Any], key: str, where: str) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where}: {key} is missing or not a positive integer")
    return value


def spec_from_hf_config(cfg: dict[str, Any], name: str, quant: Quant, source: str) -> ModelSpec:
    """Read the facts prefetch-tune needs out of a Hugging Face config.json dict."""
    if "kv_lora_rank" in cfg:
        raise ConfigError(
            f"{source}: MLA models (kv_lora_rank) are not modelled; "
            "prefetch-tune covers Qwen3-style attention"
        )
    hidden = _require(cfg, "hidden_size", source)
    heads = _require(cfg, "num_attention_heads", source)
    experts = int(cfg.get("num_experts") or cfg.get("n_routed_experts") or 0)
    return ModelSpec(
        name=name,
        hidden=hidden,
        intermediate=_require(cfg, "intermediate_size", source),
        layers=_require(cfg, "num_hidden_layers", source),
        heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        vocab=_require(cfg, "vocab_size", source),
        quant=quant,
        experts=experts,
        experts_per_token=int(cfg.get("num_experts_per_tok") or 0) if experts else 0,
        moe_intermediate=_require(cfg, "moe_intermediate_size", source) if experts else 0,
        source=source,
    )


def catalog_names() -> list[str]:
    return sorted(p.stem for p in (configs_dir() / "models").glob("*.json"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return obj


def detect_quant(model_dir: Path) -> Quant | None:
    """W8A8 when the directory's quantization description says so; None when it says nothing."""
    for desc_name in ("quant_model_description.json", "quant_model_description_w8a8.json"):
        desc = model_dir / desc_name
        if desc.is_file():
            values = {str(v).upper() for v in _read_json(desc).values() if isinstance(v, str)}
            return "w8a8" if any(v.startswith("W8A8") for v in values) else "bf16"
    cfg = _read_json(model_dir / "config.json")
    qcfg = cfg.get("quantization_config")
    if isinstance(qcfg, dict) and "w8a8" in json.dumps(qcfg).lower():
        return "w8a8"
    return None


def load_model(ref: str, quant: Quant | None = None) -> ModelSpec:
    """A catalog name (`qwen3-32b`) or a path to a local Hugging Face model directory."""
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path}: no config.json in this model directory")
        detected = detect_quant(path)
        chosen: Quant = quant or detected or "bf16"
        return spec_from_hf_config(
            _read_json(path / "config.json"), path.name, chosen, str(path.resolve())
        )
    if "/" in ref or ref.startswith("."):
        raise ConfigError(f"--model {ref}: no such model directory")
    entry = configs_dir() / "models" / f"{ref.lower()}.json"
    if not entry.is_file():
        names = catalog_names()
        import difflib

        close = difflib.get_close_matches(ref.lower(), names, n=1)
        hint = f", did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"--model {ref}: unknown model{hint} (catalog: {', '.join(names)}; "
            "or give a local model directory)"
        )
    doc = _read_json(entry)
    return spec_from_hf_config(
        doc["config"],
        doc["name"],
        quant or "w8a8",
        f"catalog:{doc['name']} ({doc.get('source', 'config.json')})",
    )
