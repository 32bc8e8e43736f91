"""Which weight-prefetch runtime an environment will use, checked from outside it.

`check_runtime(python)` runs the shared stdlib-only probe (`runtime.versions`) in that Python (a
subprocess, so the vLLM environment may differ from prefetch-tune's own), asking it to resolve
every hook point too, and turns its facts into a verdict by the shared version rule:

* `native`: vLLM-Ascend v0.15.0rc1..v0.23.x (or any build with `vllm_ascend.ops.weight_prefetch`)
  reads `weight_prefetch_config` itself; the plugin stays off.
* `plugin`: v0.24.0rc1 and later; prefetch-tune's `vllm.general_plugins` entry point must be
  visible there and every hook point must resolve.
* `unsupported` (older than v0.15.0rc1) and `absent` (no vLLM-Ascend) are refused, with the reason.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefetch_tune.errors import ConfigError
from prefetch_tune.runtime.hooks import HOOK_POINTS, WORKER_HOOK
from prefetch_tune.runtime.plugin import ENV_CAP_MIB, ENV_MARKER_DIR, ENV_RUNTIME
from prefetch_tune.runtime.versions import (
    ENTRY_POINT_GROUP,
    ENTRY_POINT_NAME,
    ENTRY_POINT_VALUE,
    MLP_ENV,
    NATIVE_MODULE,
    RuntimeVerdict,
    classify_runtime,
    entry_point,
    mlp_env_problem,
    probe_request,
    probe_source,
)
from prefetch_tune.runtime.versions import run_probe as _run_probe

ENV_KEYS = (
    ENV_RUNTIME,
    ENV_MARKER_DIR,
    ENV_CAP_MIB,
    "VLLM_PLUGINS",
    MLP_ENV,
)


@dataclass(frozen=True)
class HookCheck:
    name: str
    target: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class RuntimeCheck:
    """The verdict for one environment, with the facts behind it."""

    python: str
    python_version: str | None
    versions: dict[str, str | None]
    verdict: RuntimeVerdict
    reason: str
    native_module: bool
    entry_point: str | None  # value of prefetch-tune's entry point there; None: not visible
    hooks: tuple[HookCheck, ...]
    env: dict[str, str]
    problems: tuple[str, ...]
    notes: tuple[str, ...]

    @property
    def ready(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ready"] = self.ready
        return out


def resolve_python(python: str | None) -> str:
    """The Python executable to probe; ConfigError when `python` is not one."""
    if python is None:
        import sys

        return sys.executable
    if os.sep in python or (os.altsep and os.altsep in python) or Path(python).exists():
        path = Path(python).expanduser()
        if not path.exists():
            raise ConfigError(f"--python {python}: no such file")
        if path.is_dir():
            raise ConfigError(f"--python {python}: is a directory, not a Python executable")
        if not os.access(path, os.X_OK):
            raise ConfigError(f"--python {python}: not executable")
        return str(path)
    found = shutil.which(python)
    if found is None:
        raise ConfigError(f"--python {python}: not found on PATH")
    return found


def run_probe(python: str, timeout: float = 600.0) -> dict[str, Any]:
    """Run the shared probe (runtime.versions) in `python`, resolving every hook point."""
    targets = [(hp.name, hp.module, hp.attr) for hp in (*HOOK_POINTS, WORKER_HOOK)]
    return _run_probe(python, probe_request(targets, ENV_KEYS), timeout=timeout)


def evaluate(facts: dict[str, Any]) -> RuntimeCheck:
    """Turn the probe's facts into a verdict, problems (not ready) and notes."""
    python = str(facts.get("python") or "python")
    versions: dict[str, str | None] = dict(facts.get("versions") or {})
    env: dict[str, str] = dict(facts.get("env") or {})
    ascend_version = versions.get("vllm-ascend")
    native_module = bool(facts.get("native_module"))
    importable = bool(facts.get("vllm_ascend_importable")) or ascend_version is not None
    verdict, reason = classify_runtime(ascend_version, native_module, importable)
    plugin_entry = entry_point(facts)
    hook_facts: dict[str, str] = dict(facts.get("hooks") or {})
    hooks = tuple(
        HookCheck(hp.name, hp.target, hook_facts.get(hp.name) == "ok", hook_facts.get(hp.name, ""))
        for hp in (*HOOK_POINTS, WORKER_HOOK)
    )
    problems: list[str] = []
    notes: list[str] = []
    if versions.get("vllm") is None:
        problems.append("vLLM is not installed")
    if verdict == "absent":
        problems.append(f"vLLM-Ascend is not installed in {python}")
    elif verdict == "unsupported":
        problems.append(reason)
    elif verdict == "native":
        notes.append("vLLM-Ascend's own weight prefetch runs; native-0.23 semantics apply")
        mlp_env = mlp_env_problem(ascend_version, env.get(MLP_ENV))
        if mlp_env is not None:
            problems.append(mlp_env)
        if env.get(ENV_RUNTIME, "").lower() == "force":
            problems.append(
                f"{ENV_RUNTIME}=force would run the plugin on top of the native prefetch "
                "(every weight prefetched twice); unset it"
            )
    else:  # plugin
        if plugin_entry is None:
            problems.append(
                f"prefetch-tune's {ENTRY_POINT_GROUP} entry point is not visible in {python}: "
                "pip install prefetch-tune into that environment"
            )
        elif plugin_entry != ENTRY_POINT_VALUE:
            problems.append(
                f"entry point {ENTRY_POINT_NAME} points at {plugin_entry}, expected "
                f"{ENTRY_POINT_VALUE} (a stale install?)"
            )
        unresolved = [f"{h.target} ({h.detail})" for h in hooks if not h.ok]
        if unresolved:
            problems.append("hook points that do not resolve: " + "; ".join(unresolved))
        allowed = env.get("VLLM_PLUGINS")
        if allowed is not None and ENTRY_POINT_NAME not in [p.strip() for p in allowed.split(",")]:
            problems.append(
                f"VLLM_PLUGINS={allowed} does not include {ENTRY_POINT_NAME}, so vLLM never "
                "loads the plugin"
            )
        if env.get(ENV_RUNTIME, "").lower() == "off":
            notes.append(f"{ENV_RUNTIME}=off in this environment: the plugin will not install")
    return RuntimeCheck(
        python=python,
        python_version=facts.get("python_version"),
        versions=versions,
        verdict=verdict,
        reason=reason,
        native_module=native_module,
        entry_point=plugin_entry,
        hooks=hooks,
        env=env,
        problems=tuple(problems),
        notes=tuple(notes),
    )


def check_runtime(python: str | None = None, *, timeout: float = 600.0) -> RuntimeCheck:
    """Probe `python` (default: this interpreter) and judge which prefetch runtime it will use."""
    if not timeout > 0:
        raise ConfigError(f"--timeout {timeout}: must be > 0")
    return evaluate(run_probe(resolve_python(python), timeout))


__all__ = [
    "NATIVE_MODULE",
    "HookCheck",
    "RuntimeCheck",
    "check_runtime",
    "evaluate",
    "probe_source",
    "resolve_python",
    "run_probe",
]
