"""prefetch-tune's vLLM plugin: runs the plan's prefetch operations on vLLM-Ascend >= v0.24.0rc1.

vLLM calls every `vllm.general_plugins` entry point once in each process it starts: the API
server, the EngineCore and every worker. `register()` is therefore re-entrant and cheap: it reads
the environment, looks for vllm-ascend on disk without importing it, and never imports torch.

How it finds the worker. Hooks only matter where a model runs, i.e. wherever vLLM-Ascend's
`NPUWorker` loads one. With the multiprocessing executor that is a worker process, where vLLM
calls `register()` from `WorkerWrapperBase.init_worker` (seen on the call stack, which also holds
the worker's `vllm_config`: an invalid `weight_prefetch_config` is rejected right there). With
the uni-process executor (TP 1) the worker lives in the EngineCore process, where `register()`
already ran before any worker existed. Both cases are covered by the same lazy step: `register()`
wraps `NPUWorker.load_model` (at once when `vllm_ascend.worker.worker` is imported, else through
a post-import hook on that module, so nothing is imported early). When a worker loads its model,
the wrapper validates the config, installs the hooks *before* the model is built (vLLM's
CustomOps bind `forward_oot` at construction), lets the model load, indexes it, and logs one line
(plus a marker file when `PREFETCH_TUNE_MARKER_DIR` is set). Processes that never load a model
never install anything.

It stays out of the way when vLLM-Ascend has native weight prefetch (v0.15.0rc1..v0.23.x, or any
build with `vllm_ascend.ops.weight_prefetch`), refuses versions before v0.15.0rc1, and obeys
`PREFETCH_TUNE_RUNTIME=auto|off|force` (force: skip the version checks).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from prefetch_tune import __version__
from prefetch_tune.errors import ConfigError
from prefetch_tune.prefetch import PrefetchConfig, parse_additional_config
from prefetch_tune.runtime.versions import (
    DISTS,
    ENTRY_POINT_GROUP,
    ENTRY_POINT_NAME,
    ENTRY_POINT_VALUE,
    NATIVE_MODULE,
    RuntimeVerdict,
    classify_runtime,
    dist_version,
    parse_version,
    probe,
)

if TYPE_CHECKING:
    from prefetch_tune.models import Layout, ModelSpec, Quant
    from prefetch_tune.runtime.hooks import DeviceOps, InstallReport, Runtime
    from prefetch_tune.runtime.plan import PlanOptions

logger = logging.getLogger("vllm.prefetch_tune")

ENV_RUNTIME = "PREFETCH_TUNE_RUNTIME"
ENV_MARKER_DIR = "PREFETCH_TUNE_MARKER_DIR"
ENV_CAP_MIB = "PREFETCH_TUNE_CAP_MIB"
MODES = ("auto", "off", "force")
WORKER_MODULE = "vllm_ascend.worker.worker"

# ------------------------------------------------------------------------------ version checks


@dataclass(frozen=True)
class AscendInfo:
    """What this process can tell about vLLM-Ascend without importing it."""

    importable: bool
    version: str | None
    native_module: bool
    verdict: RuntimeVerdict
    reason: str


def detect_ascend() -> AscendInfo:
    """The version rule applied to this process's vLLM-Ascend (the shared probe, in-process)."""
    facts = probe({"dists": ["vllm-ascend"], "native_module": NATIVE_MODULE})
    importable = bool(facts["vllm_ascend_importable"])
    version = facts["versions"]["vllm-ascend"] if importable else None
    native = importable and bool(facts["native_module"])
    verdict, reason = classify_runtime(version, native, importable)
    return AscendInfo(importable, version, native, verdict, reason)


# ---------------------------------------------------------------------------- config and facts


def runtime_mode() -> str:
    raw = os.environ.get(ENV_RUNTIME, "").strip().lower() or "auto"
    if raw not in MODES:
        raise ConfigError(f"{ENV_RUNTIME}={raw}: expected one of {', '.join(MODES)}")
    return raw


def read_prefetch_config(vllm_config: Any) -> PrefetchConfig:
    """Strictly parse `weight_prefetch_config` from the vLLM config's `additional_config`."""
    additional = getattr(vllm_config, "additional_config", None) or {}
    if not isinstance(additional, Mapping):
        raise ConfigError(
            f"prefetch-tune runtime: additional_config: expected an object, got {additional!r}"
        )
    try:
        text = json.dumps(dict(additional), default=str)
        return parse_additional_config(text, "additional_config")
    except ConfigError as exc:
        raise ConfigError(f"prefetch-tune runtime: invalid --additional-config: {exc}") from None


def _as_dict(obj: Any) -> dict[str, Any]:
    if isinstance(obj, Mapping):
        return dict(obj)
    to_dict = getattr(obj, "to_dict", None)
    if callable(to_dict):
        result = to_dict()
        if isinstance(result, dict):
            return result
    return dict(vars(obj)) if obj is not None else {}


def model_facts(vllm_config: Any) -> tuple[ModelSpec, Layout]:
    """The ModelSpec and Layout the plan needs, from the vLLM config (hf_config, parallel)."""
    from prefetch_tune.models import Layout, spec_from_hf_config

    model_config = vllm_config.model_config
    hf = getattr(model_config, "hf_text_config", None) or model_config.hf_config
    served = getattr(model_config, "served_model_name", None)
    if isinstance(served, list | tuple):
        served = served[0] if served else None
    model_path = str(getattr(model_config, "model", "") or "model")
    name = str(served or Path(model_path).name or model_path)
    quant: Quant = "w8a8" if getattr(model_config, "quantization", None) else "bf16"
    spec = spec_from_hf_config(_as_dict(hf), name, quant, f"vllm config ({model_path})")
    parallel = vllm_config.parallel_config
    layout = Layout(
        tp=int(getattr(parallel, "tensor_parallel_size", 1) or 1),
        dp=int(getattr(parallel, "data_parallel_size", 1) or 1),
        ep=bool(getattr(parallel, "enable_expert_parallel", False)),
    )
    spec.check_layout(layout)
    return spec, layout


def plan_options() -> PlanOptions:
    """The plugin's plan options: the cap (`PREFETCH_TUNE_CAP_MIB`, default 18 MiB)."""
    from prefetch_tune.runtime.plan import DEFAULT_CAP_BYTES, PlanOptions

    raw = os.environ.get(ENV_CAP_MIB, "").strip()
    if not raw:
        return PlanOptions(cap_bytes=DEFAULT_CAP_BYTES)
    try:
        mib = float(raw)
    except ValueError:
        raise ConfigError(f"{ENV_CAP_MIB}={raw}: not a number") from None
    if not mib > 0 or mib == float("inf"):
        raise ConfigError(f"{ENV_CAP_MIB}={raw}: must be a positive number of MiB")
    return PlanOptions(cap_bytes=max(1, int(mib * 1024 * 1024)))


# ------------------------------------------------------------------------------------- status


@dataclass
class PluginStatus:
    """What the plugin did in this process (for logs, markers and tests)."""

    state: str = "unregistered"  # off|skipped|native|armed|inactive|active
    reason: str = ""
    worker: bool = False
    hooks_installed: list[str] = field(default_factory=list)
    hooks_missing: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    marker: str | None = None


@dataclass
class _State:
    registered: bool = False
    status: PluginStatus = field(default_factory=PluginStatus)
    finder: _PostImportFinder | None = None
    worker_patch: tuple[Any, str, Any] | None = None
    report: InstallReport | None = None


_STATE = _State()


def status() -> PluginStatus:
    return _STATE.status


def _set_status(state: str, reason: str, **facts: Any) -> PluginStatus:
    current = _STATE.status
    _STATE.status = PluginStatus(
        state=state,
        reason=reason,
        worker=facts.pop("worker", current.worker),
        hooks_installed=facts.pop("hooks_installed", []),
        hooks_missing=facts.pop("hooks_missing", {}),
        config=facts.pop("config", current.config),
        marker=current.marker,
    )
    return _STATE.status


def versions() -> dict[str, str | None]:
    return {**{dist: dist_version(dist) for dist in DISTS}, "prefetch-tune": __version__}


def write_marker(extra: Mapping[str, Any] | None = None) -> Path | None:
    """With PREFETCH_TUNE_MARKER_DIR set, write `prefetch-tune-<pid>.json` with the facts."""
    directory = os.environ.get(ENV_MARKER_DIR, "").strip()
    if not directory:
        return None
    current = _STATE.status
    facts: dict[str, Any] = {
        "tool": "prefetch-tune",
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "state": current.state,
        "reason": current.reason,
        "semantics": "plugin",
        "hooks_installed": current.hooks_installed,
        "hooks_missing": current.hooks_missing,
        "config": current.config,
        "versions": versions(),
        **dict(extra or {}),
    }
    path = Path(directory) / f"prefetch-tune-{os.getpid()}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(facts, indent=2, sort_keys=True, default=str) + "\n")
        tmp.replace(path)
    except OSError as exc:
        logger.warning("prefetch-tune runtime: cannot write marker %s (%s)", path, exc)
        return None
    current.marker = str(path)
    return path


# -------------------------------------------------------------------------------- activation


def _inactive(reason: str, config: PrefetchConfig | None, extra: Mapping[str, Any]) -> None:
    _set_status(
        "inactive",
        reason,
        worker=True,
        config=config.to_json_obj() if config is not None else None,
    )
    logger.info(
        "prefetch-tune runtime: inactive (%s), 0 hooks, semantics plugin, config %s",
        reason,
        config.canonical_json() if config is not None else "{}",
    )
    write_marker(extra)


def activate(
    vllm_config: Any,
    model: Any | None = None,
    *,
    device: DeviceOps | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Runtime | None:
    """Validate the config and install the hooks for `vllm_config` (None when prefetch is off).

    Call before the model is built; pass `model` (or call `announce(runtime, model)` later) to
    index it. Raises ConfigError for an invalid weight_prefetch_config.
    """
    from prefetch_tune.runtime import hooks

    config = read_prefetch_config(vllm_config)
    facts = dict(extra or {})
    if not config.enabled:
        hooks.set_active(None)
        _inactive("weight_prefetch_config is absent or disabled", config, facts)
        return None
    options = plan_options()
    try:
        spec, layout = model_facts(vllm_config)
    except (ConfigError, AttributeError, TypeError, ValueError) as exc:
        # Serving goes on without prefetch; the log line and the marker say why.
        logger.warning("prefetch-tune runtime: cannot plan for this model: %s", exc)
        hooks.set_active(None)
        _inactive(f"model not supported: {exc}", config, facts)
        return None
    report = hooks.install_hooks()
    runtime = hooks.Runtime(
        spec,
        layout,
        config,
        options,
        device or hooks.default_device_factory(),
        report.start_points,
        report.join_points,
    )
    hooks.set_active(runtime)
    _STATE.report = report
    _set_status(
        "active",
        "hooks installed",
        worker=True,
        hooks_installed=list(report.installed),
        hooks_missing=dict(report.missing),
        config=config.to_json_obj(),
    )
    if model is not None:
        announce(runtime, model, facts)
    return runtime


def announce(runtime: Runtime, model: Any, extra: Mapping[str, Any] | None = None) -> None:
    """Index the loaded `model`, then log the activity line and write the marker."""
    layers = runtime.attach_model(model) if model is not None else 0
    prepare = getattr(runtime.device, "prepare", None)
    if callable(prepare):
        try:
            prepare()
        except Exception as exc:
            logger.warning(
                "prefetch-tune runtime: cannot prepare device %s (%s)", runtime.device.name, exc
            )
    current = _STATE.status
    described = runtime.describe()
    logger.info(
        "prefetch-tune runtime: active, %d hooks, semantics plugin, config %s "
        "(model %s %s %s, %d layers indexed, cap %.1f MiB, device %s%s)",
        len(current.hooks_installed),
        runtime.config.canonical_json(),
        runtime.model.name,
        runtime.model.quant,
        runtime.layout.label(),
        layers,
        runtime.options.cap_bytes / (1024 * 1024),
        runtime.device.name,
        f"; missing hook points: {', '.join(current.hooks_missing)}"
        if current.hooks_missing
        else "",
    )
    for op, why in runtime.unexecutable.items():
        logger.warning("prefetch-tune runtime: %s is never issued: %s", op, why)
    write_marker({**described, **dict(extra or {})})


def _worker_model(worker: Any) -> Any | None:
    """The loaded model: `worker.get_model()`, else the model runner's."""
    for owner, attr in (
        (worker, "get_model"),
        (getattr(worker, "model_runner", None), "get_model"),
    ):
        getter = getattr(owner, attr, None)
        if callable(getter):
            try:
                model = getter()
            except Exception:
                continue
            if model is not None:
                return model
    return getattr(getattr(worker, "model_runner", None), "model", None)


def _wrap_load_model(original: Callable[..., Any]) -> Callable[..., Any]:
    import functools

    from prefetch_tune.runtime.hooks import HOOK_MARK

    @functools.wraps(original)
    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        extra = {
            "rank": getattr(self, "rank", None),
            "local_rank": getattr(self, "local_rank", None),
        }
        runtime = activate(self.vllm_config, extra=extra)  # before the model is built
        result = original(self, *args, **kwargs)
        if runtime is not None:
            model = _worker_model(self)
            if model is None:
                logger.warning("prefetch-tune runtime: cannot reach the loaded model to index it")
            announce(runtime, model, extra)
        return result

    setattr(load_model, HOOK_MARK, original)
    return load_model


def _patch_worker(module: ModuleType) -> None:
    """Wrap `NPUWorker.load_model` in vllm_ascend.worker.worker (once)."""
    from prefetch_tune.runtime import hooks

    if _STATE.worker_patch is not None:
        return
    try:
        owner, name, current = hooks.resolve(hooks.WORKER_HOOK)
    except Exception as exc:
        logger.warning(
            "prefetch-tune runtime: hook point %s not found (%s); the runtime cannot start",
            hooks.WORKER_HOOK.target,
            f"{type(exc).__name__}: {exc}",
        )
        return
    if hasattr(current, hooks.HOOK_MARK):
        return
    previous = hooks.patch(owner, name, _wrap_load_model(current))
    _STATE.worker_patch = (owner, name, previous)


class _CallbackLoader(importlib.abc.Loader):
    """Runs the real loader, then the callback on the fresh module."""

    def __init__(self, loader: importlib.abc.Loader, callback: Callable[[ModuleType], None]):
        self._loader = loader
        self._callback = callback

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        self._callback(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Calls `callback(module)` right after `fullname` is imported (then removes itself)."""

    def __init__(self, fullname: str, callback: Callable[[ModuleType], None]) -> None:
        self.fullname = fullname
        self.callback = callback
        self._busy = False

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.fullname or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy = False
        if spec is None or spec.loader is None:
            return None
        spec.loader = _CallbackLoader(spec.loader, self._fire)
        return spec

    def _fire(self, module: ModuleType) -> None:
        self.remove()
        self.callback(module)

    def remove(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def _arm() -> None:
    """Make the next NPUWorker.load_model in this process activate the runtime."""
    module = sys.modules.get(WORKER_MODULE)
    if module is not None:
        _patch_worker(module)
        return
    if _STATE.finder is None:
        _STATE.finder = _PostImportFinder(WORKER_MODULE, _patch_worker)
        sys.meta_path.insert(0, _STATE.finder)


# ----------------------------------------------------------------------------------- register


_NO_WORKER = object()


def worker_vllm_config(max_depth: int = 64) -> Any:
    """The vllm_config of `WorkerWrapperBase.init_worker` on the call stack (None when it holds
    none); `_NO_WORKER` when this call does not come from a worker's init."""
    frame = sys._getframe(1)
    depth = 0
    while frame is not None and depth < max_depth:
        if frame.f_code.co_name == "init_worker":
            owner = frame.f_locals.get("self")
            if owner is not None and any(
                klass.__name__ == "WorkerWrapperBase" for klass in type(owner).__mro__
            ):
                config = frame.f_locals.get("vllm_config")
                kwargs = frame.f_locals.get("kwargs")
                if config is None and isinstance(kwargs, dict):
                    config = kwargs.get("vllm_config")
                if config is None:
                    config = getattr(owner, "__dict__", {}).get("vllm_config")
                return config
        frame = frame.f_back  # type: ignore[assignment]
        depth += 1
    return _NO_WORKER


def register() -> None:
    """The `vllm.general_plugins` entry point; safe to call any number of times, in any process."""
    if _STATE.registered:
        return
    mode = runtime_mode()
    if mode == "off":
        _set_status("off", f"{ENV_RUNTIME}=off")
        logger.info("prefetch-tune runtime: off (%s=off)", ENV_RUNTIME)
        _STATE.registered = True
        return
    found = worker_vllm_config()
    in_worker = found is not _NO_WORKER
    if mode == "auto":
        info = detect_ascend()
        if info.verdict != "plugin":
            state = "native" if info.verdict == "native" else "skipped"
            _set_status(state, info.reason, worker=in_worker)
            log = logger.debug if info.verdict == "absent" else logger.info
            log("prefetch-tune runtime: not installed: %s", info.reason)
            if in_worker:
                write_marker()
            _STATE.registered = True
            return
    if in_worker and found is not None:
        config = read_prefetch_config(found)  # an invalid config stops the worker here
        if not config.enabled:
            _inactive("weight_prefetch_config is absent or disabled", config, {})
            _STATE.registered = True
            return
    _arm()
    _set_status(
        "armed",
        "hooks install when a vLLM-Ascend NPUWorker loads its model in this process"
        + (" (forced)" if mode == "force" else ""),
        worker=in_worker,
    )
    _STATE.registered = True


def reset() -> None:
    """Undo everything register()/activate() did in this process (for tests)."""
    from prefetch_tune.runtime import hooks

    if _STATE.finder is not None:
        _STATE.finder.remove()
    if _STATE.worker_patch is not None:
        hooks.unpatch(*_STATE.worker_patch)
    hooks.uninstall_hooks()
    _STATE.registered = False
    _STATE.status = PluginStatus()
    _STATE.finder = None
    _STATE.worker_patch = None
    _STATE.report = None


def installed_report() -> InstallReport | None:
    """What the last activation installed (None before any)."""
    return _STATE.report


__all__ = [  # the version rule and the entry point's identity are re-exported from versions
    "ENTRY_POINT_GROUP",
    "ENTRY_POINT_NAME",
    "ENTRY_POINT_VALUE",
    "ENV_CAP_MIB",
    "ENV_MARKER_DIR",
    "ENV_RUNTIME",
    "MODES",
    "NATIVE_MODULE",
    "WORKER_MODULE",
    "AscendInfo",
    "PluginStatus",
    "RuntimeVerdict",
    "activate",
    "announce",
    "classify_runtime",
    "detect_ascend",
    "dist_version",
    "installed_report",
    "model_facts",
    "parse_version",
    "plan_options",
    "read_prefetch_config",
    "register",
    "reset",
    "runtime_mode",
    "status",
    "versions",
    "worker_vllm_config",
    "write_marker",
]
