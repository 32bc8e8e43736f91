"""The hook table against the real vllm-ascend releases (downloaded, cached between runs).

Marked `wheels`: needs the package registry (or a filled PREFETCH_TUNE_WHEEL_CACHE). Every
release from 0.24.0rc1 is checked statically (zipfile/tarfile + ast, no torch_npu).
"""

from __future__ import annotations

import shutil
import textwrap
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prefetch_tune.cli import app
from prefetch_tune.runtime.lines import line_for
from prefetch_tune.runtime.static_check import check_archive, default_cache, download

RELEASES = (
    "0.24.0rc1",
    "0.25.1rc1",
    "0.26.0rc1",
    "0.27.1rc1",
    "0.28.0rc1",
    "0.29.0rc1",
    "0.30.0rc1",
    "0.30.0rc2",
)

pytestmark = pytest.mark.wheels


@pytest.mark.parametrize("version", RELEASES)
def test_every_hook_point_resolves_in_the_real_release(version: str) -> None:
    result = check_archive(download(version, default_cache()))
    assert result.version == version
    assert result.line is line_for(version)
    assert result.ok, "\n".join(result.failures())


def test_renamed_symbol_fails_naming_line_and_symbol(tmp_path: Path) -> None:
    real = download("0.25.1rc1", default_cache())
    copy = tmp_path / real.name
    member = "vllm_ascend/ops/activation.py"
    with zipfile.ZipFile(real) as src, zipfile.ZipFile(copy, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == member:
                data = data.replace(b"class AscendSiluAndMul(", b"class AscendSiluAndMulV2(")
            dst.writestr(item, data)
    result = check_archive(copy)
    assert not result.ok
    assert result.failures() == [
        "vllm-ascend 0.25.1rc1 (line 0.25): silu_and_mul "
        "vllm_ascend.ops.activation:AscendSiluAndMul.forward_oot: class AscendSiluAndMul not found"
    ]
    out = CliRunner().invoke(app, ["runtime-check", "--wheel", str(copy)])
    assert out.exit_code == 1
    assert "class AscendSiluAndMul not found" in out.output


def test_renamed_parameter_fails(tmp_path: Path) -> None:
    real = download("0.24.0rc1", default_cache())
    copy = tmp_path / real.name
    member = "vllm_ascend/quantization/methods/w8a8_static.py"
    with zipfile.ZipFile(real) as src, zipfile.ZipFile(copy, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == member:
                data = data.replace(b"layer._quant_comm_config", b"layer._comm_config")
            dst.writestr(item, data)
    failures = check_archive(copy).failures()
    assert len(failures) == 1 and "attribute _quant_comm_config not used" in failures[0]


@pytest.mark.parametrize(
    ("model", "live", "dead"),
    [
        ("qwen3-32b", "4 live knobs: attn.qkv, attn.o, mlp.gate_up, mlp.down", "dense model"),
        ("qwen3-235b-a22b", "2 live knobs: attn.qkv, attn.o", "no practical hook point"),
    ],
)
def test_runtime_check_version_per_knob(model: str, live: str, dead: str) -> None:
    out = CliRunner().invoke(app, ["runtime-check", "--version", "0.25.1rc1", "--model", model])
    assert out.exit_code == 0, out.output
    assert live in out.output
    assert "moe.gate_up: dead: " in out.output and dead in out.output


def test_fakes_match_the_real_sources() -> None:
    """The behaviour tests' fakes (tests/test_plugin.py) have the real 0.25.1rc1 signatures."""
    from test_plugin import FAKE_SOURCES, FAKE_VERSION

    from prefetch_tune.runtime.static_check import check_hook, read_sources

    real = read_sources(download(FAKE_VERSION, default_cache()))
    fakes = {
        name.replace(".", "/") + ".py": textwrap.dedent(text) for name, text in FAKE_SOURCES.items()
    }
    for hook in line_for(FAKE_VERSION).hooks:
        real_check = check_hook(real, hook)
        fake_check = check_hook(fakes, hook)
        assert real_check.ok, real_check.detail
        # Same module, class, method and leading parameters; a fake may skip attributes.
        assert fake_check.ok or fake_check.detail.startswith("attribute"), fake_check.detail


def test_cache_is_reused(tmp_path: Path) -> None:
    real = download("0.25.1rc1", default_cache())
    shutil.copy(real, tmp_path / real.name)
    assert download("0.25.1rc1", tmp_path) == tmp_path / real.name
