"""Which prefetch runtime a vLLM-Ascend has, and the probe that finds out: the one place for both.

The rule (docs/design.md section 4), by vLLM-Ascend version:

* before v0.11.0rc1: no `weight_prefetch_config` at all;
* v0.11.0rc1 .. v0.14.x: native, but only the `attn` and `moe` ratios (MLP prefetch is two
  env-var byte sizes) -- refused, like the versions before it;
* v0.15.0rc1 .. v0.23.x (or any build with `vllm_ascend.ops.weight_prefetch`): native, read by
  vLLM-Ascend itself (`--semantics native-0.23`); v0.15.0rc1 .. v0.17.x still let the deprecated
  `VLLM_ASCEND_ENABLE_PREFETCH_MLP` override the mlp ratios;
* v0.24.0rc1 and later: removed, so prefetch-tune's plugin runs it (`--semantics plugin`).

`probe()` collects the facts behind that verdict in a Python: the distributions' versions,
whether vllm-ascend is importable and ships the native module, whether prefetch-tune and its
`vllm.general_plugins` entry point are visible, and optionally whether hook points resolve. It
runs in this process (the plugin, without importing vllm-ascend) or, through `run_probe()`, in
another Python (the serving environment of `runtime-check` and of the vllm backend).

Import-light on purpose: the plugin's `register()` imports this in every vLLM process, so only
the standard library (and prefetch-tune's errors) may be imported at module level.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from prefetch_tune.errors import BackendError, ConfigError

if TYPE_CHECKING:
    from prefetch_tune.prefetch import Semantics

NATIVE_MODULE = "vllm_ascend.ops.weight_prefetch"
ENTRY_POINT_GROUP = "vllm.general_plugins"
ENTRY_POINT_NAME = "prefetch_tune"
ENTRY_POINT_VALUE = "prefetch_tune.runtime.plugin:register"
MLP_ENV = "VLLM_ASCEND_ENABLE_PREFETCH_MLP"
DISTS = ("vllm", "vllm-ascend", "torch", "torch-npu", "prefetch-tune")

FIRST_NATIVE = "0.11.0rc1"  # weight_prefetch_config (attn, moe) appears (#3146)
FIRST_NATIVE_MLP = "0.15.0rc1"  # the mlp knobs move into weight_prefetch_config (#6442)
FIRST_WITHOUT_MLP_ENV = "0.18.0rc1"  # the deprecated MLP env vars are dropped (#7357)
FIRST_WITHOUT_NATIVE = "0.24.0rc1"  # weight prefetch removed (#11949)

RuntimeVerdict = Literal["absent", "unsupported", "native", "plugin"]
SEMANTICS: dict[str, Semantics] = {"native": "native-0.23", "plugin": "plugin"}

# ------------------------------------------------------------------------------------ versions

_VERSION_RE = re.compile(
    r"^v?(\d+)\.(\d+)(?:\.(\d+))?(?:[-_.]?(a|b|rc)[-_.]?(\d+))?"
    r"(?:[-_.]?post(\d+))?(?:[-_.]?dev(\d+))?(?:\+.*)?$",
    re.IGNORECASE,
)
_PRE_RANK = {"a": 0, "b": 1, "rc": 2}

VersionKey = tuple[int, int, int, int, int, int, int]


def parse_version(text: str) -> VersionKey | None:
    """A sortable key for PEP 440-ish versions (`0.23.0`, `v0.24.0rc1`, `0.24.1.dev5+g1a2b`)."""
    match = _VERSION_RE.match(text.strip())
    if match is None:
        return None
    major, minor, patch, pre, pre_n, post, dev = match.groups()
    if pre:
        stage = _PRE_RANK[pre.lower()]
    elif dev and not post:
        stage = -1  # X.Y.Z.devN comes before X.Y.Z's pre-releases
    else:
        stage = 3
    return (
        int(major),
        int(minor),
        int(patch or 0),
        stage,
        int(pre_n or 0),
        int(post or 0),
        0 if dev else 1,
    )


def _key(version: str) -> VersionKey:
    key = parse_version(version)
    assert key is not None, version
    return key


_KEY_FIRST_NATIVE = _key(FIRST_NATIVE)
_KEY_FIRST_NATIVE_MLP = _key(FIRST_NATIVE_MLP)
_KEY_FIRST_WITHOUT_MLP_ENV = _key(FIRST_WITHOUT_MLP_ENV)
_KEY_FIRST_WITHOUT_NATIVE = _key(FIRST_WITHOUT_NATIVE)

SUPPORTED = (
    f"prefetch-tune supports vllm-ascend v{FIRST_NATIVE_MLP}..v0.23.x natively (--semantics "
    f"native-0.23) and v{FIRST_WITHOUT_NATIVE} and later with its own plugin (--semantics plugin)"
)


def _is_dev_build(version: str) -> bool:
    return "dev" in version or "+" in version


def classify_runtime(
    version: str | None,
    native_module: bool | None,
    importable: bool = True,
    what: str = "vllm-ascend",
) -> tuple[RuntimeVerdict, str]:
    """Which runtime serves `weight_prefetch_config` for this vLLM-Ascend, and why.

    `native_module`: whether `vllm_ascend.ops.weight_prefetch` exists (None: not known, then the
    version alone decides). `what` names where `version` came from, in the reason.
    """
    if not importable:
        return "absent", f"{what} is not installed"
    shown = f"{what} {version}" if version else f"{what} (version unknown)"
    key = parse_version(version) if version else None
    if key is not None and key < _KEY_FIRST_NATIVE_MLP:
        if key < _KEY_FIRST_NATIVE:
            why = f"it has no weight_prefetch_config at all (it came in v{FIRST_NATIVE})"
        else:
            why = (
                "its weight_prefetch_config has only the attn and moe ratios (before it the mlp "
                "knobs are two VLLM_ASCEND_* env-var byte sizes, not weight_prefetch_config)"
            )
        return "unsupported", f"{shown} is older than v{FIRST_NATIVE_MLP}: {why}; {SUPPORTED}"
    if native_module:
        return (
            "native",
            f"{shown} has native weight prefetch ({NATIVE_MODULE}); it reads "
            "weight_prefetch_config itself, so the plugin stays off",
        )
    if (
        key is not None
        and key < _KEY_FIRST_WITHOUT_NATIVE
        and version
        and (native_module is None or not _is_dev_build(version))
    ):
        return (
            "native",
            f"{shown} is in v{FIRST_NATIVE_MLP}..v0.23.x, which has native weight prefetch; "
            "the plugin stays off",
        )
    return (
        "plugin",
        f"{shown} has no native weight prefetch (removed in v{FIRST_WITHOUT_NATIVE}); "
        "prefetch-tune's plugin runs it",
    )


def runtime_for(
    version: str, what: str = "vllm-ascend", native_module: bool | None = None
) -> tuple[Semantics, str]:
    """The semantics `classify_runtime` gives this version, and why; ConfigError when it is refused."""
    if parse_version(version) is None:
        raise ConfigError(f"{what} {version!r} is not a version prefetch-tune can read")
    verdict, reason = classify_runtime(version, native_module, what=what)
    if verdict not in SEMANTICS:
        raise ConfigError(f"{reason}: upgrade the serving environment")
    return SEMANTICS[verdict], reason


def semantics_for(
    version: str, what: str = "vllm-ascend", native_module: bool | None = None
) -> Semantics:
    """native-0.23 for v0.15.0rc1 .. v0.23.x, plugin for v0.24.0rc1+; ConfigError otherwise."""
    return runtime_for(version, what, native_module)[0]


def truthy(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no", "off")


def mlp_env_problem(version: str | None, value: str | None) -> str | None:
    """Why `VLLM_ASCEND_ENABLE_PREFETCH_MLP=value` spoils tuning on this vllm-ascend (or None)."""
    key = parse_version(version) if version else None
    in_window = key is not None and _KEY_FIRST_NATIVE_MLP <= key < _KEY_FIRST_WITHOUT_MLP_ENV
    if not in_window or not truthy(value):
        return None
    return (
        f"{MLP_ENV}={value} is set: vllm-ascend {version} (v{FIRST_NATIVE_MLP}..v0.17.x) then "
        "uses its two SIZE env vars as MLP prefetch byte sizes instead of the mlp ratios; unset it"
    )


# --------------------------------------------------------------------------------------- probe


def dist_version(dist: str) -> str | None:
    """The installed version of distribution `dist` (either spelling), None if not installed."""
    import importlib.metadata

    for name in (dist, dist.replace("-", "_")):
        try:
            return importlib.metadata.version(name)
        except Exception:  # a broken dist-info counts as not installed
            continue
    return None


def probe(request: Mapping[str, Any]) -> dict[str, Any]:
    """Facts about vLLM-Ascend in this Python, without importing it (except `targets`).

    `request` (every key optional): `dists` (versions to report), `env` (variables to report),
    `native_module` (the module that marks native prefetch), `group` (entry points to list),
    `targets` ([name, module, attr] hook points to import and resolve). Sent as source to other
    Pythons by `probe_source()` together with `dist_version`: stdlib only, Python 3.8+.
    """
    import importlib
    import importlib.util
    import os
    import sys
    from pathlib import Path

    out: dict[str, Any] = {
        "python": sys.executable,
        "python_version": sys.version.split()[0],
        "versions": {dist: dist_version(dist) for dist in request.get("dists", ())},
        "env": {key: os.environ[key] for key in request.get("env", ()) if key in os.environ},
    }
    locations: list[str] | None = None
    module = sys.modules.get("vllm_ascend")
    if module is not None:
        locations = [str(p) for p in getattr(module, "__path__", None) or []]
    else:
        try:
            spec = importlib.util.find_spec("vllm_ascend")
        except Exception:
            spec = None
        if spec is not None:
            locations = [str(p) for p in spec.submodule_search_locations or []]
    out["vllm_ascend_importable"] = locations is not None
    native_name = request.get("native_module", "vllm_ascend.ops.weight_prefetch")
    native = native_name in sys.modules
    for location in locations or []:
        ops = Path(location) / "ops"
        if (ops / "weight_prefetch.py").is_file() or (ops / "weight_prefetch").is_dir():
            native = True
    out["native_module"] = native
    try:
        out["prefetch_tune_importable"] = importlib.util.find_spec("prefetch_tune") is not None
    except Exception:
        out["prefetch_tune_importable"] = False
    if request.get("group"):
        import importlib.metadata as md

        all_eps: Any = md.entry_points()
        if hasattr(all_eps, "select"):
            group = list(all_eps.select(group=request["group"]))
        else:  # Python < 3.10
            group = list(all_eps.get(request["group"], []))
        out["entry_points"] = [{"name": ep.name, "value": ep.value} for ep in group]
    hooks: dict[str, str] = {}
    for name, module_name, attr in request.get("targets", ()):
        try:
            owner: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                owner = getattr(owner, part)
            hooks[name] = "ok"
        except BaseException as exc:  # an import may even call sys.exit
            hooks[name] = f"{type(exc).__name__}: {exc}"[:300]
    out["hooks"] = hooks
    return out


PROBE_MARK = "PREFETCH_TUNE_PROBE "


def probe_source() -> str:
    """The probe as a `python -c` program: it prints the facts for the JSON request in argv[1]."""
    import inspect

    return (
        "from __future__ import annotations\n"
        + inspect.getsource(dist_version)
        + "\n"
        + inspect.getsource(probe)
        + "\nimport json, sys\n"
        + f"print({PROBE_MARK!r} + json.dumps(probe(json.loads(sys.argv[1]))), flush=True)\n"
    )


def probe_request(
    targets: Iterable[Sequence[str]] = (),
    env: Sequence[str] = (),
    dists: Sequence[str] = DISTS,
) -> dict[str, Any]:
    """A request for `run_probe`: always the versions, the native module and the entry point."""
    return {
        "dists": list(dists),
        "env": list(env),
        "native_module": NATIVE_MODULE,
        "group": ENTRY_POINT_GROUP,
        "targets": [list(t) for t in targets],
    }


def run_probe(
    python: str,
    request: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 600.0,
    label: str | None = None,
) -> dict[str, Any]:
    """Run `probe(request)` in the Python `python` (a subprocess) and return its facts.

    `env` is added to this process's environment. ConfigError when it cannot be run or is no
    working Python, BackendError when it does not finish in `timeout` seconds; `label` starts
    those messages (default `--python PYTHON`).
    """
    label = label or f"--python {python}"
    request = dict(request) if request is not None else probe_request()
    # A neutral working directory, so a source checkout in cwd cannot shadow installed packages.
    with tempfile.TemporaryDirectory(prefix="prefetch-tune-probe-") as cwd:
        try:
            done = subprocess.run(
                [python, "-c", probe_source(), json.dumps(request)],
                env={**os.environ, **env} if env is not None else None,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=cwd,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise BackendError(f"{label}: the probe did not finish in {timeout:g} s") from None
        except OSError as exc:
            raise ConfigError(f"{label}: cannot run it ({exc.strerror or exc})") from None
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(PROBE_MARK):
            try:
                facts = json.loads(line[len(PROBE_MARK) :])
            except json.JSONDecodeError:
                break
            if isinstance(facts, dict):
                return facts
            break
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    raise ConfigError(f"{label}: not a working Python 3 (probe exit {done.returncode}: {last})")


def entry_point(facts: Mapping[str, Any]) -> str | None:
    """The value of prefetch-tune's entry point in the probed Python (None: not visible)."""
    for ep in facts.get("entry_points") or []:
        if ep.get("name") == ENTRY_POINT_NAME:
            return str(ep.get("value"))
    return None


__all__ = [
    "DISTS",
    "ENTRY_POINT_GROUP",
    "ENTRY_POINT_NAME",
    "ENTRY_POINT_VALUE",
    "FIRST_NATIVE",
    "FIRST_NATIVE_MLP",
    "FIRST_WITHOUT_MLP_ENV",
    "FIRST_WITHOUT_NATIVE",
    "MLP_ENV",
    "NATIVE_MODULE",
    "PROBE_MARK",
    "SEMANTICS",
    "RuntimeVerdict",
    "VersionKey",
    "classify_runtime",
    "dist_version",
    "entry_point",
    "mlp_env_problem",
    "parse_version",
    "probe",
    "probe_request",
    "probe_source",
    "run_probe",
    "runtime_for",
    "semantics_for",
    "truthy",
]
