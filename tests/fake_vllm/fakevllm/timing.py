"""Token timing of the fake `vllm serve`: the built-in performance model at the served point.

Test-only: the fake server answers with the simulated TTFT and TPOT of the config it was started
with, so searches against it see the same landscape as the sim backend (simulated timing).
"""

from __future__ import annotations

from prefetch_tune.backends.base import OperatingPoint, Workload
from prefetch_tune.backends.sim import evaluate_point
from prefetch_tune.models import Layout, load_model
from prefetch_tune.prefetch import PrefetchConfig, parse_additional_config


def serving_timing(
    model: str,
    tp: int,
    dp: int,
    ep: bool,
    max_num_seqs: int,
    additional_config: str | None,
    input_len: int,
    output_len: int,
    hardware: str = "atlas-a2",
) -> tuple[float, float]:
    """(TTFT, TPOT) in seconds: simulated timing for the fake server.

    No capacity check: like real vLLM, the fake serves a batch whose KV cache does not fit.
    """
    spec = load_model(model)
    config = (
        parse_additional_config(additional_config) if additional_config else PrefetchConfig.off()
    )
    point = OperatingPoint(
        model=spec,
        layout=Layout(tp=tp, dp=dp, ep=ep),
        max_num_seqs=max_num_seqs,
        hardware=hardware,
        workload=Workload(input_len=input_len, output_len=output_len),
    )
    metrics, _ = evaluate_point(config, point)
    return metrics["mean_ttft_ms"] / 1e3, metrics["mean_tpot_ms"] / 1e3
