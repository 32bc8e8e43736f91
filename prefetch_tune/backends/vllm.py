"""The `vllm` backend: measure a prefetch config with a real `vllm serve` and `vllm bench serve`.

Per evaluation it starts ``vllm serve MODEL <serve_args> --max-num-seqs N --additional-config
JSON`` (the candidate deep-merged into the user's own ``--additional-config``, translated for
the semantics the runtime check found), waits until the server answers, runs ``vllm bench serve``
at the point's concurrency, reads the saved result JSON by key and returns its numeric values.
A repeat (``repeat >= 1``) of the config evaluated just before re-runs the benchmark against the
same, still running server; a new config (or ``repeat == 0``) stops the old server first. The
last server is stopped by ``close()``, at interpreter exit, and on SIGTERM.

Failures (startup_timeout, server_crash, out_of_memory, benchmark_failure, incomplete_benchmark)
raise ``BackendError`` with that ``failure_class``: the study records them and goes on. Bad
settings raise ``ConfigError`` naming the key.

Before the first server the runtime check runs the shared probe (``runtime.versions``) in the
serving environment's Python (``python`` below, else ``--python``, else the interpreter of the
``vllm`` script) for its vllm, vllm-ascend and prefetch-tune versions and whether vllm-ascend
ships the native prefetch module; without vllm-ascend there it falls back to
``vllm --version`` (vLLM-Ascend releases carry vLLM's version numbers) and says so.
vllm-ascend v0.15.0rc1 .. v0.23.x has the native ``weight_prefetch_config`` (``--semantics
native-0.23``); v0.24.0rc1 and later removed it, so prefetch-tune's plugin runs it
(``--semantics plugin``, prefetch-tune must be installed in the serving environment); older
versions are refused.

The ``[vllm]`` table of a tune file (every key optional)::

    [vllm]
    model = "vllm-ascend/Qwen3-32B-W8A8"  # what `vllm serve` serves; default: the catalog's
                                          # w8a8_id (W8A8) or hf_id, or the model directory
    serve_args = ["--quantization", "ascend", "--additional-config", '{"pa_shape_list":[48]}']
                                          # extra `vllm serve` args; prefetch-tune sets
                                          # --host/--port/--max-num-seqs itself and adds the
                                          # parallel-layout flags unless given (then they must
                                          # match --tp/--dp/--ep); the candidate is deep-merged
                                          # into the --additional-config given here
    env = { HCCL_OP_EXPANSION_MODE = "AIV" }  # added to the environment of serve and bench
    host = "127.0.0.1"                    # where the server listens (default 127.0.0.1)
    port = 8000                           # default: a free port per server start
    ready_timeout = 1800                  # seconds until the server must answer (default 1800)
    stop_grace = 30                       # seconds between SIGTERM and SIGKILL (default 30)
    python = "/opt/vllm/bin/python"       # the serving environment's Python (for the check)
    executable = "vllm"                   # the vllm CLI (default: `vllm` next to `python`,
                                          # else `vllm` on PATH)
    require_runtime_marker = false        # plugin semantics: fail unless the serve log shows
                                          # a "prefetch-tune runtime" line (the plugin is live)

    [vllm.bench]
    dataset_name = "random"               # default random
    num_prompts = 288                     # default 4 x concurrency (must not be less)
    num_warmups = 72                      # default one wave (= concurrency)
    extra_args = ["--seed", "1"]          # extra `vllm bench serve` args (appended last)
    timeout = 3600                        # seconds per benchmark run (default 3600)

Input and output lengths come from the point's workload (``--input-len``/``--output-len``,
default 3500/1500) and ``--max-concurrency`` is the point's concurrency.

Logs: ``RESULTS_DIR/logs/<point>-mns<N>/trial-<seq>-<config>-serve.log``, ``...-bench.log`` and
``...-bench.json`` (the saved benchmark result); ``<seq>`` counts evaluations in that directory,
``<config>`` is ``off``, ``default`` or a hash of the candidate's canonical JSON, and repeats add
``-r<repeat>``.
"""

from __future__ import annotations

import atexit
import contextlib
import difflib
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefetch_tune.backends.base import Metrics, OperatingPoint, register_backend
from prefetch_tune.backends.bench import BenchSettings, build_bench_command, run_bench
from prefetch_tune.backends.server import ServerProcess, exit_on_sigterm, free_port
from prefetch_tune.errors import BackendError, ConfigError
from prefetch_tune.models import MiB
from prefetch_tune.prefetch import ROOT_KEY, PrefetchConfig, Semantics, emit, load_json_object
from prefetch_tune.resources import configs_dir
from prefetch_tune.runtime.plugin import ENV_CAP_MIB, ENV_MARKER_DIR
from prefetch_tune.runtime.versions import (
    ENTRY_POINT_GROUP,
    MLP_ENV,
    entry_point,
    mlp_env_problem,
    probe_request,
    run_probe,
    runtime_for,
    semantics_for,
)

log = logging.getLogger(__name__)

TABLE = "[vllm]"
VLLM_KEYS: dict[str, str] = {
    "model": "string",
    "serve_args": "list of strings",
    "env": "table of strings",
    "host": "string",
    "port": "integer",
    "ready_timeout": "number",
    "stop_grace": "number",
    "python": "string",
    "executable": "string",
    "bench": "table",
    "require_runtime_marker": "boolean",
}
BENCH_KEYS: dict[str, str] = {
    "dataset_name": "string",
    "num_prompts": "integer",
    "num_warmups": "integer",
    "extra_args": "list of strings",
    "timeout": "number",
}

RESERVED_SERVE_FLAGS = {
    "--max-num-seqs": "prefetch-tune sets it per operating point (--max-num-seqs / max_num_seqs)",
    "--host": "use `host` in the [vllm] table",
    "--port": "use `port` in the [vllm] table",
    "--model": "use `model` in the [vllm] table",
}
TP_FLAGS = ("--tensor-parallel-size", "-tp")
DP_FLAGS = ("--data-parallel-size", "-dp")
EP_FLAG = "--enable-expert-parallel"
ADDITIONAL_CONFIG = "--additional-config"

RUNTIME_LINE = re.compile(r"prefetch-tune runtime: (active|inactive)\b")
"""The serve-log line prefetch-tune's plugin writes once a worker has loaded its model."""

PROBE_TIMEOUT = 120.0


# ---------------------------------------------------------------- settings


def _fail(key: str, what: str) -> ConfigError:
    return ConfigError(f"{TABLE} {key}: {what}")


def _unknown_key(table: str, key: str, known: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f", did you mean {close[0]!r}?" if close else f" (known: {', '.join(known)})"
    return ConfigError(f"{table} {key}: unknown key{hint}")


def _str(table: Mapping[str, Any], key: str, where: str = TABLE) -> str | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} {key}: must be a non-empty string, got {value!r}")
    return value


def _number(table: Mapping[str, Any], key: str, where: str = TABLE) -> float | None:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{where} {key}: must be a number > 0, got {value!r}")
    return float(value)


def _int(table: Mapping[str, Any], key: str, minimum: int, where: str = TABLE) -> int | None:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where} {key}: must be an integer >= {minimum}, got {value!r}")
    return value


def _str_list(table: Mapping[str, Any], key: str, where: str = TABLE) -> tuple[str, ...]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(
            f"{where} {key}: must be a list of strings (one argument each), got {value!r}"
        )
    return tuple(value)


@dataclass(frozen=True)
class VllmSettings:
    """The validated `[vllm]` table (see the module docstring)."""

    model: str | None = None
    serve_args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    host: str = "127.0.0.1"
    port: int | None = None
    ready_timeout: float = 1800.0
    stop_grace: float = 30.0
    python: str | None = None
    executable: str | None = None
    require_runtime_marker: bool = False
    dataset_name: str = "random"
    num_prompts: int | None = None
    num_warmups: int | None = None
    bench_extra_args: tuple[str, ...] = ()
    bench_timeout: float = 3600.0
    user_additional_config: str | None = None
    other_serve_args: tuple[str, ...] = field(default=(), repr=False)

    @property
    def env_dict(self) -> dict[str, str]:
        return dict(self.env)


def parse_vllm_table(table: Mapping[str, Any] | None) -> VllmSettings:
    """Validate a `[vllm]` table; ConfigError names the offending key."""
    table = dict(table or {})
    for key in table:
        if key not in VLLM_KEYS:
            raise _unknown_key(TABLE, key, list(VLLM_KEYS))
    env_obj = table.get("env", {})
    if not isinstance(env_obj, dict):
        raise _fail(
            "env", 'must be a table of strings, e.g. env = { HCCL_OP_EXPANSION_MODE = "AIV" }'
        )
    env: list[tuple[str, str]] = []
    for name, value in env_obj.items():
        if not isinstance(value, str):
            raise _fail(f"env.{name}", f'must be a string (quote it: {name} = "{value}")')
        env.append((str(name), value))
    bench_obj = table.get("bench", {})
    if not isinstance(bench_obj, dict):
        raise _fail("bench", "must be a table ([vllm.bench])")
    for key in bench_obj:
        if key not in BENCH_KEYS:
            raise _unknown_key("[vllm.bench]", key, list(BENCH_KEYS))
    marker = table.get("require_runtime_marker", False)
    if not isinstance(marker, bool):
        raise _fail("require_runtime_marker", f"must be true or false, got {marker!r}")
    port = _int(table, "port", 1)
    if port is not None and port > 65535:
        raise _fail("port", f"{port} is not a TCP port (1..65535)")
    serve_args = _str_list(table, "serve_args")
    additional, others = split_serve_args(serve_args)
    bench_where = "[vllm.bench]"
    settings = VllmSettings(
        model=_str(table, "model"),
        serve_args=serve_args,
        env=tuple(env),
        host=_str(table, "host") or "127.0.0.1",
        port=port,
        ready_timeout=_number(table, "ready_timeout") or 1800.0,
        stop_grace=_number(table, "stop_grace") or 30.0,
        python=_str(table, "python"),
        executable=_str(table, "executable"),
        require_runtime_marker=marker,
        dataset_name=_str(bench_obj, "dataset_name", bench_where) or "random",
        num_prompts=_int(bench_obj, "num_prompts", 1, bench_where),
        num_warmups=_int(bench_obj, "num_warmups", 0, bench_where),
        bench_extra_args=_str_list(bench_obj, "extra_args", bench_where),
        bench_timeout=_number(bench_obj, "timeout", bench_where) or 3600.0,
        user_additional_config=additional,
        other_serve_args=others,
    )
    # Refused extra benchmark flags are reported now, not at the first trial.
    BenchSettings(extra_args=settings.bench_extra_args)
    return settings


def _flag_value(args: Sequence[str], i: int, flag: str) -> tuple[str, int]:
    """The value of the flag at args[i] (`--f v` or `--f=v`) and the index after it."""
    arg = args[i]
    if arg.startswith(flag + "="):
        return arg[len(flag) + 1 :], i + 1
    if i + 1 >= len(args):
        raise _fail("serve_args", f"{flag} needs a value")
    return args[i + 1], i + 2


def split_serve_args(args: Sequence[str]) -> tuple[str | None, tuple[str, ...]]:
    """(the user's --additional-config JSON or None, the other args); refuses reserved flags."""
    additional: str | None = None
    others: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name = arg.split("=", 1)[0]
        if name in RESERVED_SERVE_FLAGS:
            raise _fail("serve_args", f"{name} is not allowed: {RESERVED_SERVE_FLAGS[name]}")
        if name == ADDITIONAL_CONFIG:
            if additional is not None:
                raise _fail("serve_args", f"{ADDITIONAL_CONFIG} is given twice")
            additional, i = _flag_value(args, i, ADDITIONAL_CONFIG)
            obj = load_json_object(additional, f"{TABLE} serve_args {ADDITIONAL_CONFIG}")
            if ROOT_KEY in obj:
                raise _fail(
                    "serve_args",
                    f"{ADDITIONAL_CONFIG} already holds {ROOT_KEY}; leave it out, prefetch-tune "
                    "sets it per trial",
                )
            continue
        others.append(arg)
        i += 1
    return additional, tuple(others)


def _find_flag(args: Sequence[str], names: Sequence[str]) -> str | None:
    """The value of the first of `names` in args, or None."""
    for i, arg in enumerate(args):
        for name in names:
            if arg == name or arg.startswith(name + "="):
                value, _ = _flag_value(args, i, name)
                return value
    return None


# ---------------------------------------------------------------- runtime check


@dataclass(frozen=True)
class RuntimeInfo:
    """What the serving environment runs, and the semantics that follow from it."""

    vllm: str | None
    vllm_ascend: str | None
    source: str  # how the versions were found
    python: str | None
    prefetch_tune: str | None
    prefetch_tune_importable: bool | None
    semantics: Semantics
    notes: tuple[str, ...] = ()
    reason: str = ""  # why these versions mean these semantics (the shared version rule)

    def describe(self) -> dict[str, Any]:
        return {
            "vllm_version": self.vllm,
            "vllm_ascend_version": self.vllm_ascend,
            "version_source": self.source,
            "serving_python": self.python,
            "prefetch_tune_in_serving_env": self.prefetch_tune,
            "semantics_detected": self.semantics,
            "semantics_reason": self.reason,
            "runtime_notes": list(self.notes),
        }


def _env_path(env: Mapping[str, str]) -> str:
    return env.get("PATH", os.environ.get("PATH", os.defpath))


def script_python(executable: str, env: Mapping[str, str]) -> str | None:
    """The interpreter named by the `#!` line of the `vllm` script, if it is a Python."""
    path = shutil.which(executable, path=_env_path(env))
    if path is None:
        return None
    try:
        with open(path, "rb") as fh:
            first = fh.readline(512).decode("utf-8", "replace").strip()
    except OSError:
        return None
    if not first.startswith("#!"):
        return None
    try:
        parts = shlex.split(first[2:])
    except ValueError:
        return None
    if parts and Path(parts[0]).name == "env":
        parts = [p for p in parts[1:] if not p.startswith("-")]
        found = shutil.which(parts[0], path=_env_path(env)) if parts else None
        parts = [found] if found else []
    if parts and Path(parts[0]).name.startswith("python") and Path(parts[0]).is_file():
        return parts[0]
    return None


def _run_quiet(cmd: list[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            cmd,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"runtime check: cannot run {shlex.join(cmd)}: {exc}") from None


VERSION_IN_TEXT = re.compile(r"v?(\d+\.\d+(?:\.\d+)?(?:\S*)?)")


def cli_version(executable: str, env: Mapping[str, str]) -> str:
    """The version `vllm --version` prints (its last version-looking line)."""
    proc = _run_quiet([executable, "--version"], env)
    if proc.returncode != 0:
        raise ConfigError(
            f"runtime check: `{executable} --version` exited with code {proc.returncode}: "
            f"{proc.stderr.strip()[-300:]}"
        )
    for line in reversed(proc.stdout.strip().splitlines()):
        m = VERSION_IN_TEXT.fullmatch(line.strip())
        if m:
            return m.group(1)
    raise ConfigError(f"runtime check: `{executable} --version` printed no version")


def detect_serving_runtime(
    python: str | None, executable: str, env: Mapping[str, str]
) -> RuntimeInfo:
    """Find the serving environment's versions and the semantics they imply (see module doc).

    The probe and the version rule are the shared ones of `prefetch_tune.runtime.versions`.
    """
    notes: list[str] = []
    facts: dict[str, Any] = {}
    used_python = python or script_python(executable, env)
    if used_python is not None:
        try:
            facts = run_probe(
                used_python,
                probe_request(),
                env=env,
                timeout=PROBE_TIMEOUT,
                label=f"runtime check: the Python {used_python}",
            )
        except (ConfigError, BackendError) as exc:
            if python is not None:  # the user named it: a broken one is an error
                raise ConfigError(str(exc)) from None
            notes.append(f"{exc}; ignored it")
    versions = facts.get("versions") or {}
    ascend = versions.get("vllm-ascend")
    vllm = versions.get("vllm")
    if isinstance(ascend, str):
        source = f"importlib.metadata in {used_python}"
        native = facts.get("native_module")
        semantics, reason = runtime_for(
            ascend, "vllm-ascend", native if isinstance(native, bool) else None
        )
    else:
        where = f"the Python {used_python}" if used_python else "no serving Python (set `python`)"
        vllm = cli_version(executable, env)
        source = f"`{executable} --version`"
        notes.append(
            f"vllm-ascend not found by {where}; took vLLM's version {vllm} from "
            f"`{executable} --version` as vllm-ascend's (their releases share version numbers)"
        )
        semantics, reason = runtime_for(vllm, f"vllm (from `{executable} --version`)")
        ascend = None
    serving_env = isinstance(ascend, str)  # the probed Python is the serving environment
    importable = facts.get("prefetch_tune_importable") if serving_env else None
    if semantics == "plugin":
        if importable is False:
            raise ConfigError(
                f"vllm-ascend {ascend} has no native weight prefetch; prefetch-tune's plugin "
                f"must run inside vLLM, but prefetch-tune is not installed in {used_python}: "
                f"run `{used_python} -m pip install prefetch-tune` (or `pip install -e` this "
                "checkout there)"
            )
        if importable is not True:
            notes.append(
                "could not verify that prefetch-tune (the plugin) is installed in the serving "
                "environment; without it every candidate measures like off"
            )
        elif entry_point(facts) is None:
            notes.append(
                f"prefetch-tune is importable in {used_python} but its {ENTRY_POINT_GROUP} "
                "entry point is not visible there, so vLLM will not load the plugin; "
                "reinstall it (`pip install prefetch-tune`, not a path on PYTHONPATH)"
            )
    for note in notes:
        log.warning("prefetch-tune runtime check: %s", note)
    tune_version = versions.get("prefetch-tune")
    return RuntimeInfo(
        vllm=vllm if isinstance(vllm, str) else None,
        vllm_ascend=ascend if isinstance(ascend, str) else None,
        source=source,
        python=used_python,
        prefetch_tune=tune_version if isinstance(tune_version, str) else None,
        prefetch_tune_importable=importable if isinstance(importable, bool) else None,
        semantics=semantics,
        notes=tuple(notes),
        reason=reason,
    )


# ---------------------------------------------------------------- the backend


def served_model(point: OperatingPoint, settings: VllmSettings) -> str:
    """What `vllm serve` gets: the table's model, else the catalog id or model directory."""
    if settings.model:
        return settings.model
    source = point.model.source
    if not source.startswith("catalog:"):
        return source
    try:
        doc = json.loads((configs_dir() / "models" / f"{point.model.name}.json").read_text())
    except (OSError, ValueError):
        return point.model.name
    key = "w8a8_id" if point.model.quant == "w8a8" else "hf_id"
    value = doc.get(key) or doc.get("hf_id")
    return value if isinstance(value, str) else point.model.name


def config_label(config: PrefetchConfig) -> str:
    """`off`, `default` or a short hash of the canonical JSON: a file-name-safe config key."""
    if config == PrefetchConfig.off():
        return "off"
    if config == PrefetchConfig.default():
        return "default"
    return "c" + hashlib.sha1(config.canonical_json().encode()).hexdigest()[:10]


_INSTANCES: weakref.WeakSet[VllmBackend] = weakref.WeakSet()


def _close_all() -> None:
    for backend in list(_INSTANCES):
        with contextlib.suppress(Exception):
            backend.close()


atexit.register(_close_all)


class VllmBackend:
    """Real measurements: one `vllm serve` per config, `vllm bench serve` per run."""

    name = "vllm"
    measured = True

    def __init__(
        self,
        vllm: Mapping[str, Any] | None = None,
        python: str | None = None,
        results_dir: Path | str = Path("results"),
        **_: Any,
    ) -> None:
        self.settings = parse_vllm_table(vllm)
        self.python = python or self.settings.python
        self.results_dir = Path(results_dir)
        self.env = self.settings.env_dict
        self.executable = self.settings.executable or self._default_executable()
        self.runtime: RuntimeInfo | None = None
        self.last_artifacts: dict[str, str] = {}
        self._last_commands: dict[str, str] = {}
        self._server: ServerProcess | None = None
        self._server_key: str | None = None
        self._served_id: str | None = None
        self.server_starts = 0  # counted into each result's cost
        self._lock = threading.RLock()
        _INSTANCES.add(self)

    def _default_executable(self) -> str:
        if self.python:
            sibling = Path(self.python).parent / "vllm"
            if sibling.is_file() and os.access(sibling, os.X_OK):
                return str(sibling)
        return "vllm"

    # -- runtime check -------------------------------------------------------------------

    def check_semantics(self, point: OperatingPoint) -> RuntimeInfo:
        """Detect the serving versions once; the point's semantics must agree with them."""
        if self.runtime is None:
            self.runtime = detect_serving_runtime(self.python, self.executable, self.env)
            self._check_deprecated_env(self.runtime)
        detected = self.runtime.semantics
        if point.semantics != detected:
            raise ConfigError(
                f"--semantics {point.semantics} does not fit the serving environment: "
                f"{self.runtime.reason} ({self.runtime.source}), so it needs --semantics {detected}"
            )
        return self.runtime

    def _check_deprecated_env(self, info: RuntimeInfo) -> None:
        if info.semantics != "native-0.23":
            return
        value = self.env.get(MLP_ENV, os.environ.get(MLP_ENV, ""))
        problem = mlp_env_problem(info.vllm_ascend or info.vllm, value)
        if problem is not None:
            raise ConfigError(f"{TABLE} env: {problem}")

    # -- commands ------------------------------------------------------------------------

    def additional_config(self, config: PrefetchConfig, semantics: Semantics) -> str:
        """The candidate deep-merged into the user's --additional-config (canonical JSON)."""
        return emit(config, semantics, self.settings.user_additional_config).json

    def server_env(
        self, point: OperatingPoint, semantics: Semantics, marker_dir: Path | None = None
    ) -> dict[str, str]:
        """The table's env, plus the plugin's cap (and marker directory) under plugin semantics."""
        env = dict(self.env)
        if semantics != "plugin":
            return env
        cap = f"{point.options.cap_bytes / MiB:g}"
        given = env.get(ENV_CAP_MIB)
        if given is not None and given != cap:
            raise _fail(
                f"env.{ENV_CAP_MIB}",
                f"{given} disagrees with --cap-mib {cap}; leave it out, prefetch-tune sets it",
            )
        env[ENV_CAP_MIB] = cap
        if marker_dir is not None:
            env[ENV_MARKER_DIR] = str(marker_dir)
        return env

    def _layout_args(self, point: OperatingPoint) -> list[str]:
        args = self.settings.other_serve_args
        out: list[str] = []
        for flags, want in ((TP_FLAGS, point.layout.tp), (DP_FLAGS, point.layout.dp)):
            given = _find_flag(args, flags)
            if given is None:
                if want != 1 or flags is TP_FLAGS:
                    out += [flags[0], str(want)]
            elif given != str(want):
                raise _fail(
                    "serve_args",
                    f"{flags[0]} {given} disagrees with the operating point ({flags[0]} {want}; "
                    f"--{'tp' if flags is TP_FLAGS else 'dp'} / tune-file key)",
                )
        has_ep = EP_FLAG in args
        if point.layout.ep and not has_ep:
            out.append(EP_FLAG)
        elif has_ep and not point.layout.ep:
            raise _fail("serve_args", f"{EP_FLAG} is given but the operating point has no --ep")
        return out

    def serve_command(
        self, config: PrefetchConfig, point: OperatingPoint, port: int, semantics: Semantics
    ) -> list[str]:
        """The exact `vllm serve` argv for one candidate."""
        return [
            self.executable,
            "serve",
            served_model(point, self.settings),
            *self.settings.other_serve_args,
            *self._layout_args(point),
            "--host",
            self.settings.host,
            "--port",
            str(port),
            "--max-num-seqs",
            str(point.max_num_seqs),
            ADDITIONAL_CONFIG,
            self.additional_config(config, semantics),
        ]

    def bench_settings(self, point: OperatingPoint) -> BenchSettings:
        s = self.settings
        if s.num_prompts is not None and s.num_prompts < point.num_prompts:
            raise ConfigError(
                f"[vllm.bench] num_prompts {s.num_prompts}: below the operating point's "
                f"{point.num_prompts} (4 x concurrency {point.concurrency}); the search counts a "
                "run with fewer completed requests as incomplete"
            )
        extra = list(s.bench_extra_args)
        alias = _find_flag(s.other_serve_args, ("--served-model-name",))
        if alias is not None and _find_flag(extra, ("--served-model-name",)) is None:
            extra = ["--served-model-name", alias, *extra]
        return BenchSettings(
            dataset_name=s.dataset_name,
            input_len=point.workload.input_len,
            output_len=point.workload.output_len,
            num_prompts=s.num_prompts if s.num_prompts is not None else point.num_prompts,
            num_warmups=s.num_warmups,
            extra_args=tuple(extra),
            executable=self.executable,
            timeout=s.bench_timeout,
        )

    def bench_command(
        self, point: OperatingPoint, port: int, result_dir: Path, name: str
    ) -> list[str]:
        return build_bench_command(
            self.bench_settings(point),
            host=self.settings.host,
            port=port,
            model=served_model(point, self.settings),
            concurrency=point.concurrency,
            result_dir=result_dir,
            result_filename=name,
        )

    def logs_dir(self, point: OperatingPoint) -> Path:
        from prefetch_tune.results import point_slug

        return self.results_dir / "logs" / f"{point_slug(point, self.name)}-mns{point.max_num_seqs}"

    def describe_commands(self, point: OperatingPoint) -> list[str]:
        """Shell lines (for --dry-run) of the first candidates, off and default; starts nothing."""
        port = self.settings.port or free_port(self.settings.host)
        env = self.server_env(point, point.semantics)
        lines = [
            f"# vllm backend: --semantics {point.semantics} assumed (the runtime check of the "
            "serving environment runs before the first server starts)",
            "# environment added to serve (and bench):" + ("" if env else " (none)"),
        ]
        lines += [f"export {shlex.quote(f'{k}={v}')}" for k, v in env.items()]
        if self.settings.port is None:
            lines.append(f"# port: a free port is picked per server start (here {port})")
        logs = self.logs_dir(point)
        for label, config in (("off", PrefetchConfig.off()), ("default", PrefetchConfig.default())):
            lines.append(f"# candidate {label}: {config.canonical_json()}")
            lines.append(shlex.join(self.serve_command(config, point, port, point.semantics)))
            lines.append(
                shlex.join(self.bench_command(point, port, logs, f"dry-run-{label}-bench.json"))
            )
        return lines

    # -- evaluation ----------------------------------------------------------------------

    def _next_name(self, logs: Path, label: str, repeat: int) -> str:
        seq = 0
        if logs.is_dir():
            for path in logs.glob("trial-*"):
                m = re.match(r"trial-(\d+)-", path.name)
                if m:
                    seq = max(seq, int(m.group(1)) + 1)
        suffix = f"-r{repeat}" if repeat else ""
        return f"trial-{seq:03d}-{label}{suffix}"

    def evaluate(self, config: PrefetchConfig, point: OperatingPoint, repeat: int = 0) -> Metrics:
        """Metrics of one benchmark run; a repeat of the last config reuses its server."""
        with self._lock:
            info = self.check_semantics(point)
            semantics = info.semantics
            logs = self.logs_dir(point)
            logs.mkdir(parents=True, exist_ok=True)
            key = json.dumps([config.canonical_json(), point.describe(), semantics], sort_keys=True)
            name = self._next_name(logs, config_label(config), repeat)
            reuse = (
                repeat >= 1
                and self._server is not None
                and self._server_key == key
                and self._server.poll() is None
            )
            if not reuse:
                self._stop_server()
                self._start_server(config, point, semantics, logs, name, key)
            server = self._server
            assert server is not None and self._served_id is not None
            result_name = f"{name}-bench.json"
            cmd = self.bench_command(point, server.port, logs, result_name)
            self._last_commands["bench_command"] = shlex.join(cmd)
            self.last_artifacts = {
                "log": str(server.log_path),
                "bench_log": str(logs / f"{name}-bench.log"),
                "bench_json": str(logs / result_name),
                "serve_command": shlex.join(server.cmd),
                "bench_command": shlex.join(cmd),
            }
            try:
                return run_bench(
                    self.bench_settings(point),
                    host=self.settings.host,
                    port=server.port,
                    model=served_model(point, self.settings),
                    concurrency=point.concurrency,
                    result_dir=logs,
                    result_filename=result_name,
                    log_path=logs / f"{name}-bench.log",
                    env=self.env,
                    server=server,
                )
            except BackendError:
                self._stop_server()  # a failed run leaves no server for the next config
                raise
            except BaseException:
                self._stop_server()
                raise

    def _start_server(
        self,
        config: PrefetchConfig,
        point: OperatingPoint,
        semantics: Semantics,
        logs: Path,
        name: str,
        key: str,
    ) -> None:
        _install_sigterm_exit()
        self.server_starts += 1
        port = self.settings.port or free_port(self.settings.host)
        cmd = self.serve_command(config, point, port, semantics)
        log_path = logs / f"{name}-serve.log"
        marker_dir = logs / f"{name}-markers" if semantics == "plugin" else None
        self._last_commands["serve_command"] = shlex.join(cmd)
        self.last_artifacts = {"log": str(log_path), "serve_command": shlex.join(cmd)}
        server = ServerProcess(
            cmd,
            self.server_env(point, semantics, marker_dir),
            log_path,
            self.settings.host,
            port,
            ready_timeout=self.settings.ready_timeout,
            stop_grace=self.settings.stop_grace,
        )
        self._server, self._server_key = server, key
        server.start()
        try:
            self._served_id = server.wait_until_ready()
            if self.settings.require_runtime_marker and marker_dir is not None:
                self._require_marker(server, marker_dir, config)
        except BaseException:
            self._stop_server()
            raise

    def _require_marker(
        self, server: ServerProcess, marker_dir: Path, config: PrefetchConfig
    ) -> None:
        """Fail unless the plugin reported itself (marker file, else its serve-log line)."""
        states: set[str] = set()
        for path in sorted(marker_dir.glob("prefetch-tune-*.json")):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                states.add(str(json.loads(path.read_text()).get("state")))
        if not states:
            with contextlib.suppress(OSError):
                text = server.log_path.read_text(errors="replace")
                states = {m.group(1) for m in RUNTIME_LINE.finditer(text)}
        wanted = {"active"} if config.enabled else {"active", "inactive"}
        if states & wanted:
            return
        seen = ", ".join(sorted(states)) or "no marker file and no 'prefetch-tune runtime' line"
        raise ConfigError(
            f"{TABLE} require_runtime_marker: the plugin did not run this candidate (seen: "
            f"{seen}; serve log {server.log_path}, markers {marker_dir}), so it would measure "
            "like off; install prefetch-tune in the serving environment (`pip install "
            "prefetch-tune` with its Python) and do not exclude it with VLLM_PLUGINS"
        )

    def _stop_server(self) -> None:
        server, self._server = self._server, None
        self._server_key = None
        self._served_id = None
        if server is not None:
            server.stop()

    def close(self) -> None:
        """Stop the server kept alive for repeats (idempotent; also runs at exit)."""
        with self._lock:
            self._stop_server()

    def provenance(self) -> dict[str, Any]:
        """Versions found by the runtime check and the last serve and bench commands."""
        out: dict[str, Any] = {"vllm_executable": self.executable}
        if self.runtime is not None:
            out.update(self.runtime.describe())
        out.update(self._last_commands)
        return out


def _install_sigterm_exit() -> None:
    """SIGTERM -> SystemExit, so atexit stops our servers (only if nobody handles SIGTERM)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        exit_on_sigterm()


def _factory(**settings: Any) -> VllmBackend:
    return VllmBackend(**settings)


register_backend("vllm", _factory)

__all__ = [
    "BENCH_KEYS",
    "VLLM_KEYS",
    "RuntimeInfo",
    "VllmBackend",
    "VllmSettings",
    "detect_serving_runtime",
    "parse_vllm_table",
    "semantics_for",
]
