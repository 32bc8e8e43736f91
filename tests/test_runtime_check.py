"""`runtime-check`: the probe runs in a (fake) vLLM environment and judges native vs plugin."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from helpers import assert_bad_input
from typer.testing import CliRunner

from prefetch_tune.cli.runtime_check import runtime_check
from prefetch_tune.errors import ConfigError
from prefetch_tune.runtime.check import check_runtime, evaluate, resolve_python
from prefetch_tune.runtime.lines import all_hooks, line_for
from prefetch_tune.runtime.plugin import ENTRY_POINT_VALUE

# Stdlib-only stand-ins for the hook-point modules (the probe only resolves names).
FAKE_FILES: dict[str, str] = {
    "vllm_ascend/__init__.py": "",
    "vllm_ascend/quantization/__init__.py": "",
    "vllm_ascend/quantization/methods/__init__.py": "",
    "vllm_ascend/quantization/methods/w8a8_static.py": (
        "class AscendW8A8LinearMethod:\n"
        "    def apply(self, layer, x, bias=None, tp_rank=0):\n        return x\n"
    ),
    "vllm_ascend/ops/__init__.py": "",
    "vllm_ascend/ops/linear.py": (
        "class AscendRowParallelLinear:\n    def forward(self, input_, **kwargs):\n        pass\n"
    ),
    "vllm_ascend/ops/activation.py": (
        "class AscendSiluAndMul:\n    def forward_oot(self, x):\n        return x\n"
        "class AscendSiluAndMulWithClamp:\n    def forward_oot(self, x):\n        return x\n"
    ),
    "vllm_ascend/ops/fused_moe/__init__.py": "",
    "vllm_ascend/ops/fused_moe/moe_mlp.py": (
        "def quant_apply_mlp(hidden_states, w1, w1_scale, w2, w2_scale, group_list):\n    pass\n"
    ),
    "vllm_ascend/worker/__init__.py": "",
    "vllm_ascend/worker/worker.py": "class NPUWorker:\n    def load_model(self):\n        pass\n",
    "vllm/__init__.py": "",
}


def _dist_info(site: Path, dist: str, version: str) -> None:
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")


def fake_site(
    tmp_path: Path,
    ascend_version: str | None,
    *,
    native: bool = False,
    drop: tuple[str, ...] = (),
) -> Path:
    site = tmp_path / "site"
    for rel, text in FAKE_FILES.items():
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for name in drop:
            text = "\n".join(line for line in text.splitlines() if name not in line) + "\n"
        path.write_text(text)
    if native:
        (site / "vllm_ascend/ops/weight_prefetch.py").write_text("")
    _dist_info(site, "vllm", "0.30.0")
    if ascend_version is not None:
        _dist_info(site, "vllm-ascend", ascend_version)
    return site


@pytest.fixture
def use_site(monkeypatch: pytest.MonkeyPatch) -> Any:
    def use(site: Path) -> None:
        monkeypatch.setenv("PYTHONPATH", str(site))

    for var in ("VLLM_PLUGINS", "PREFETCH_TUNE_RUNTIME", "VLLM_ASCEND_ENABLE_PREFETCH_MLP"):
        monkeypatch.delenv(var, raising=False)
    return use


def test_current_python_without_vllm_ascend() -> None:
    report = check_runtime()
    assert report.python == sys.executable
    assert report.verdict == "absent"
    assert not report.ready
    assert report.entry_point == ENTRY_POINT_VALUE  # the editable install registers it
    assert [h.target for h in report.hooks] == [hp.target for hp in all_hooks(line_for(None))]


def test_plugin_environment_is_ready(tmp_path: Path, use_site: Any) -> None:
    use_site(fake_site(tmp_path, "0.25.1rc1"))
    report = check_runtime(sys.executable)
    assert report.verdict == "plugin", report.reason
    assert report.versions["vllm-ascend"] == "0.25.1rc1"
    assert report.versions["vllm"] == "0.30.0"
    assert all(h.ok for h in report.hooks), report.hooks
    assert report.problems == ()
    assert report.ready


def test_plugin_environment_with_a_missing_hook_point(tmp_path: Path, use_site: Any) -> None:
    use_site(fake_site(tmp_path, "0.24.0rc1", drop=("AscendSiluAndMulWithClamp",)))
    report = check_runtime(sys.executable)
    assert report.verdict == "plugin"
    assert not report.ready
    (problem,) = report.problems
    assert "AscendSiluAndMulWithClamp.forward_oot" in problem
    assert "AscendSiluAndMul.forward_oot" not in problem.replace("WithClamp.forward_oot", "")


@pytest.mark.parametrize(("version", "native"), [("0.23.0", True), ("0.18.0", False)])
def test_native_environment(tmp_path: Path, use_site: Any, version: str, native: bool) -> None:
    use_site(fake_site(tmp_path, version, native=native))
    report = check_runtime(sys.executable)
    assert report.verdict == "native"
    assert report.native_module is native
    assert report.ready


def test_native_window_with_deprecated_env_var(
    tmp_path: Path, use_site: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_site(fake_site(tmp_path, "0.16.0rc1", native=True))
    monkeypatch.setenv("VLLM_ASCEND_ENABLE_PREFETCH_MLP", "1")
    report = check_runtime(sys.executable)
    assert report.verdict == "native"
    assert any("VLLM_ASCEND_ENABLE_PREFETCH_MLP" in p for p in report.problems)


def test_old_version_is_refused_with_an_explanation(tmp_path: Path, use_site: Any) -> None:
    use_site(fake_site(tmp_path, "0.13.0", native=True))
    report = check_runtime(sys.executable)
    assert report.verdict == "unsupported"
    assert "older than v0.15.0rc1" in report.reason
    assert report.problems == (report.reason,)


def test_vllm_plugins_allow_list_must_name_the_plugin() -> None:
    facts = {
        "python": "/venv/bin/python",
        "versions": {"vllm": "0.30.0", "vllm-ascend": "0.25.1rc1"},
        "vllm_ascend_importable": True,
        "native_module": False,
        "entry_points": [{"name": "prefetch_tune", "value": ENTRY_POINT_VALUE}],
        "hooks": {hp.target: "ok" for hp in all_hooks(line_for("0.25.1rc1"))},
        "env": {"VLLM_PLUGINS": "ascend,ascend_model"},
    }
    report = evaluate(facts)
    assert report.verdict == "plugin"
    assert [p for p in report.problems if "VLLM_PLUGINS" in p]
    facts["env"] = {"VLLM_PLUGINS": "ascend, prefetch_tune"}
    assert evaluate(facts).ready
    facts["entry_points"] = []
    assert "not visible" in evaluate(facts).problems[0]


def test_bad_python_paths(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        resolve_python(str(tmp_path / "nope" / "python"))
    with pytest.raises(ConfigError, match="is a directory"):
        resolve_python(str(tmp_path))
    with pytest.raises(ConfigError, match="not found on PATH"):
        resolve_python("no-such-python-prefetch-tune")


# ---- the typer command (registered in the real app by the CLI owner) ----------------------


def invoke(*args: str) -> Any:
    app = typer.Typer()
    app.command()(runtime_check)
    return CliRunner().invoke(app, list(args))


def test_cli_bad_python_is_exit_2(tmp_path: Path) -> None:
    assert_bad_input(invoke("--python", str(tmp_path / "bin" / "python")), "no such file")
    script = tmp_path / "not-python"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    assert_bad_input(invoke("--python", str(script)), "not a working Python")


def test_cli_ready_environment_json(tmp_path: Path, use_site: Any) -> None:
    use_site(fake_site(tmp_path, "0.25.1rc1"))
    result = invoke("--python", sys.executable, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["verdict"] == "plugin" and doc["ready"] is True


def test_cli_not_ready_is_exit_1(tmp_path: Path, use_site: Any) -> None:
    use_site(fake_site(tmp_path, "0.12.0rc1", native=True))
    result = invoke("--python", sys.executable)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "older than v0.15.0rc1" in lines[-1]
