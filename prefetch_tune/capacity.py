"""Memory capacity: does a layout hold its weights and its KV cache in each rank's HBM?

vLLM gives the KV cache what is left of `--gpu-memory-utilization` x HBM after the weights. A
layout that cannot keep max-num-seqs sequences of the benchmark's full length resident would not
run the batch the operating point describes (vLLM would preempt), so modelling or searching it
is bad input. The check is necessary, not sufficient: activations and graph pools need a little
more.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefetch_tune.backends.base import OperatingPoint
from prefetch_tune.errors import ConfigError
from prefetch_tune.hardware import HardwareProfile, load_hardware

GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default, and what the vLLM-Ascend tutorials pass
GiB = 1024**3


@dataclass(frozen=True)
class MemoryFit:
    """Per-rank bytes a point needs against what its HBM offers."""

    weights: int
    kv_per_token: int
    sequences: int
    context: int
    usable: float

    @property
    def kv_cache(self) -> int:
        return self.kv_per_token * self.sequences * self.context

    @property
    def need(self) -> int:
        return self.weights + self.kv_cache

    @property
    def shortfall(self) -> float:
        return max(0.0, self.need - self.usable)


def memory_fit(point: OperatingPoint, hw: HardwareProfile) -> MemoryFit:
    w = point.workload
    return MemoryFit(
        weights=point.model.rank_weight_bytes(point.layout),
        kv_per_token=point.model.kv_bytes_per_token(point.layout),
        sequences=point.max_num_seqs,
        context=w.input_len + w.output_len,
        usable=GPU_MEMORY_UTILIZATION * hw.hbm_bytes,
    )


def check_capacity(point: OperatingPoint, hw: HardwareProfile | None = None) -> MemoryFit:
    """The fit, or a ConfigError naming the shortfall when the layout cannot hold its KV cache."""
    hw = hw or load_hardware(point.hardware)
    fit = memory_fit(point, hw)
    if fit.shortfall > 0:
        m = point.model
        raise ConfigError(
            f"--max-num-seqs {point.max_num_seqs}: {m.name} {m.quant} {point.layout.label()} "
            f"on {hw.name} cannot hold its KV cache: per rank {fit.weights / GiB:.1f} GiB "
            f"weights + {fit.kv_cache / GiB:.1f} GiB KV cache ({fit.sequences} seqs x "
            f"{fit.context} tokens x {fit.kv_per_token / 1024:.0f} KiB) = "
            f"{fit.need / GiB:.1f} GiB > {fit.usable / GiB:.1f} GiB usable "
            f"({GPU_MEMORY_UTILIZATION:g} x {hw.hbm_bytes / GiB:.0f} GiB HBM), short by "
            f"{fit.shortfall / GiB:.1f} GiB; raise --tp/--dp (with --ep for MoE) or lower "
            "--max-num-seqs"
        )
    return fit
