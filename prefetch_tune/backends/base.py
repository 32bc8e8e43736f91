"""The backend contract: evaluate one prefetch config at one operating point.

A backend returns metrics named as `vllm bench serve` names them in its saved JSON
(`output_throughput`, `mean_tpot_ms`, ...), so a result reads the same whether it was simulated
or measured. Backends are registered by name; an unknown name is a ConfigError listing the
known ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from prefetch_tune.errors import ConfigError
from prefetch_tune.models import Layout, ModelSpec
from prefetch_tune.prefetch import PrefetchConfig, Semantics
from prefetch_tune.runtime.plan import PlanOptions

Metrics = dict[str, float]

# Facts about the run rather than its performance (noise never moves them).
COUNT_METRICS = frozenset(
    {
        "completed",
        "failed",
        "num_prompts",
        "max_concurrency",
        "total_input_tokens",
        "total_output_tokens",
    }
)

# Metrics where smaller is better; every other objective is maximised.
LOWER_IS_BETTER = frozenset(
    f"{stat}_{m}_ms"
    for stat in ("mean", "median", "std", "p50", "p90", "p99")
    for m in ("ttft", "tpot", "itl", "e2el")
) | {"duration"}


@dataclass(frozen=True)
class Workload:
    """The benchmark traffic: random prompts, `concurrency` in flight (default max-num-seqs x dp)."""

    input_len: int = 3500
    output_len: int = 1500
    concurrency: int | None = None
    num_prompts: int | None = None
    max_num_batched_tokens: int = 8192

    def check(self) -> None:
        for name in ("input_len", "output_len", "max_num_batched_tokens"):
            if getattr(self, name) <= 0:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} {getattr(self, name)}: must be > 0")
        if self.concurrency is not None and self.concurrency <= 0:
            raise ConfigError(f"--concurrency {self.concurrency}: must be > 0")


@dataclass(frozen=True)
class OperatingPoint:
    """Everything but the prefetch config that decides a measurement."""

    model: ModelSpec
    layout: Layout
    max_num_seqs: int
    hardware: str = "atlas-a2"
    workload: Workload = field(default_factory=Workload)
    semantics: Semantics = "plugin"
    options: PlanOptions = field(default_factory=PlanOptions)

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0:
            raise ConfigError(f"--max-num-seqs {self.max_num_seqs}: must be > 0")
        self.workload.check()
        self.model.check_layout(self.layout)

    @property
    def concurrency(self) -> int:
        """Requests in flight: by default every data-parallel rank runs max-num-seqs."""
        return self.workload.concurrency or self.max_num_seqs * self.layout.dp

    @property
    def num_prompts(self) -> int:
        return self.workload.num_prompts or 4 * self.concurrency

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.model.name,
            "quant": self.model.quant,
            "layout": {"tp": self.layout.tp, "dp": self.layout.dp, "ep": self.layout.ep},
            "max_num_seqs": self.max_num_seqs,
            "hardware": self.hardware,
            "semantics": self.semantics,
            "sequence_parallel": self.options.sequence_parallel,
            "cap_bytes": self.options.cap_bytes,
            "workload": {
                "input_len": self.workload.input_len,
                "output_len": self.workload.output_len,
                "concurrency": self.concurrency,
                "num_prompts": self.num_prompts,
                "max_num_batched_tokens": self.workload.max_num_batched_tokens,
            },
        }


class Backend(Protocol):
    """Measures (or models) a prefetch config at an operating point."""

    name: str
    measured: bool  # False: simulated numbers, always labelled as such

    def evaluate(self, config: PrefetchConfig, point: OperatingPoint, repeat: int = 0) -> Metrics:
        """Metrics for one run; `repeat` numbers re-measurements of the same config."""
        ...


class Screening(Protocol):
    """One long-lived eager server (or its model) whose prefetch config changes between runs.

    Measurements from it rank candidates cheaply; they are eager-mode numbers, never the final
    (graph-mode) ones, and are recorded as screened.
    """

    name: str
    measured: bool
    starts: int  # server starts this screening paid (1 for a real server, 0 for the model)

    def evaluate(self, config: PrefetchConfig, point: OperatingPoint, repeat: int = 0) -> Metrics:
        """Metrics for one run of `config`, once every worker runs it."""
        ...

    def close(self) -> None: ...


def open_screening(backend: Backend, point: OperatingPoint) -> Screening:
    """The backend's screening session for `point` (ConfigError when it cannot screen)."""
    opener = getattr(backend, "screening", None)
    if not callable(opener):
        raise ConfigError(
            f"--screen: the {backend.name} backend cannot change configs while serving"
        )
    session: Screening = opener(point)
    return session


BackendFactory = Callable[..., Backend]
_REGISTRY: dict[str, BackendFactory] = {}


def register_backend(name: str, factory: BackendFactory) -> None:
    _REGISTRY[name] = factory


def backend_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_backend(name: str, **settings: Any) -> Backend:
    """Build the backend registered as `name`; unknown names list the known ones."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ConfigError(
            f"--backend {name}: unknown backend (known: {', '.join(sorted(_REGISTRY))})"
        )
    return _REGISTRY[name](**settings)


def _load_builtin() -> None:
    # Imported here so that importing the contract never imports every backend.
    import prefetch_tune.backends.sim
    import prefetch_tune.backends.vllm  # noqa: F401
