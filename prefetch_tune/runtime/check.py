"""Which weight-prefetch runtime an environment will use, checked from outside it.

`check_runtime(python)` runs a small stdlib-only probe in that Python (a subprocess, so the
vLLM environment may differ from prefetch-tune's own) and turns its facts into a verdict:

* `native`: vLLM-Ascend v0.15.0rc1..v0.23.x (or any build with `vllm_ascend.ops.weight_prefetch`)
  reads `weight_prefetch_config` itself; the plugin stays off.
* `plugin`: v0.24.0rc1 and later; prefetch-tune's `vllm.general_plugins` entry point must be
  visible there and every hook point must resolve.
* `unsupported` (older than v0.15.0rc1) and `absent` (no vLLM-Ascend) are refused, with the reason.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefetch_tune.errors import BackendError, ConfigError
from prefetch_tune.runtime.hooks import HOOK_POINTS, WORKER_HOOK
from prefetch_tune.runtime.plugin import (
    ENTRY_POINT_GROUP,
    ENTRY_POINT_NAME,
    ENTRY_POINT_VALUE,
    ENV_RUNTIME,
    NATIVE_MODULE,
    Verdict,
    classify,
    parse_version,
)

PROBE_MARK = "PREFETCH_TUNE_PROBE "
ENV_KEYS = (
    ENV_RUNTIME,
    "PREFETCH_TUNE_MARKER_DIR",
    "PREFETCH_TUNE_CAP_MIB",
    "VLLM_PLUGINS",
    "VLLM_ASCEND_ENABLE_PREFETCH_MLP",
)
DISTS = ("vllm", "vllm-ascend", "torch", "torch-npu", "prefetch-tune")


def _probe(request: dict[str, Any]) -> dict[str, Any]:
    """Runs inside the checked Python: stdlib only, Python 3.8+, imports only the hook modules."""
    import importlib
    import importlib.metadata as md
    import importlib.util
    import os
    import sys
    from pathlib import Path

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except Exception:
            return None

    out: dict[str, Any] = {
        "python": sys.executable,
        "python_version": sys.version.split()[0],
        "versions": {dist: version(dist) for dist in request["dists"]},
        "env": {key: os.environ[key] for key in request["env"] if key in os.environ},
    }
    try:
        spec = importlib.util.find_spec("vllm_ascend")
    except Exception:
        spec = None
    out["vllm_ascend_importable"] = spec is not None
    native = False
    if spec is not None:
        for location in spec.submodule_search_locations or []:
            ops = Path(location) / "ops"
            if (ops / "weight_prefetch.py").is_file() or (ops / "weight_prefetch").is_dir():
                native = True
    out["native_module"] = native
    all_eps: Any = md.entry_points()
    if hasattr(all_eps, "select"):
        group = list(all_eps.select(group=request["group"]))
    else:  # Python < 3.10
        group = list(all_eps.get(request["group"], []))
    out["entry_points"] = [{"name": ep.name, "value": ep.value} for ep in group]
    hooks: dict[str, str] = {}
    for name, module_name, attr in request["targets"]:
        try:
            owner: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                owner = getattr(owner, part)
            hooks[name] = "ok"
        except BaseException as exc:  # an import may even call sys.exit
            hooks[name] = f"{type(exc).__name__}: {exc}"[:300]
    out["hooks"] = hooks
    return out


def probe_source() -> str:
    """The probe as a `python -c` program: `_probe` plus a line that prints its JSON."""
    return (
        "from __future__ import annotations\n"
        + inspect.getsource(_probe)
        + "\nimport json, sys\n"
        + f"print({PROBE_MARK!r} + json.dumps(_probe(json.loads(sys.argv[1]))), flush=True)\n"
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
    verdict: Verdict
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
    """Run the probe in `python` and return its facts."""
    targets = [[hp.name, hp.module, hp.attr] for hp in (*HOOK_POINTS, WORKER_HOOK)]
    request = {
        "dists": list(DISTS),
        "env": list(ENV_KEYS),
        "group": ENTRY_POINT_GROUP,
        "targets": targets,
    }
    # A neutral working directory, so a source checkout in cwd cannot shadow installed packages.
    with tempfile.TemporaryDirectory(prefix="prefetch-tune-probe-") as cwd:
        try:
            done = subprocess.run(
                [python, "-c", probe_source(), json.dumps(request)],
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=cwd,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise BackendError(
                f"--python {python}: the probe did not finish in {timeout:g} s"
            ) from None
        except OSError as exc:
            raise ConfigError(f"--python {python}: cannot run it ({exc.strerror or exc})") from None
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(PROBE_MARK):
            try:
                facts: dict[str, Any] = json.loads(line[len(PROBE_MARK) :])
            except json.JSONDecodeError:
                break
            return facts
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    raise ConfigError(
        f"--python {python}: not a working Python 3 (probe exit {done.returncode}: {last})"
    )


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no", "off")


def evaluate(facts: dict[str, Any]) -> RuntimeCheck:
    """Turn the probe's facts into a verdict, problems (not ready) and notes."""
    python = str(facts.get("python") or "python")
    versions: dict[str, str | None] = dict(facts.get("versions") or {})
    env: dict[str, str] = dict(facts.get("env") or {})
    ascend_version = versions.get("vllm-ascend")
    native_module = bool(facts.get("native_module"))
    importable = bool(facts.get("vllm_ascend_importable")) or ascend_version is not None
    verdict, reason = classify(ascend_version, native_module, importable)
    entry_points = facts.get("entry_points") or []
    entry_point = next((ep["value"] for ep in entry_points if ep["name"] == ENTRY_POINT_NAME), None)
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
        key = parse_version(ascend_version) if ascend_version else None
        deprecated_window = (
            key is not None and parse_version("0.15.0rc1") <= key < parse_version("0.18.0rc1")  # type: ignore[operator]
        )
        if deprecated_window and _truthy(env.get("VLLM_ASCEND_ENABLE_PREFETCH_MLP")):
            problems.append(
                "VLLM_ASCEND_ENABLE_PREFETCH_MLP is set: on v0.15.0rc1..v0.17.x its two SIZE "
                "variables then override the mlp ratios; unset it"
            )
        if env.get(ENV_RUNTIME, "").lower() == "force":
            problems.append(
                f"{ENV_RUNTIME}=force would run the plugin on top of the native prefetch "
                "(every weight prefetched twice); unset it"
            )
    else:  # plugin
        if entry_point is None:
            problems.append(
                f"prefetch-tune's {ENTRY_POINT_GROUP} entry point is not visible in {python}: "
                "pip install prefetch-tune into that environment"
            )
        elif entry_point != ENTRY_POINT_VALUE:
            problems.append(
                f"entry point {ENTRY_POINT_NAME} points at {entry_point}, expected "
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
        entry_point=entry_point,
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
