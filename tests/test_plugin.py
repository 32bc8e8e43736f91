"""The vLLM plugin and the hooks that execute the runtime plan, against a fake vLLM-Ascend.

The fake `vllm_ascend` modules are injected through `sys.modules` and carry the class and function
names and signatures of vLLM-Ascend at HEAD (reference §3). A tiny Hugging-Face-shaped model built
from them runs through the hooked functions while a RecordingDeviceOps records every start and
join; the recording must equal the plan's operations for the same config and token count.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from prefetch_tune.errors import ConfigError
from prefetch_tune.models import Layout, spec_from_hf_config
from prefetch_tune.prefetch import parse_weight_prefetch_config
from prefetch_tune.runtime import hooks, plugin
from prefetch_tune.runtime.plan import (
    DEFAULT_CAP_BYTES,
    MLP_TOKEN_LIMIT,
    MOE_TOKEN_MIN,
    LayerPlan,
    PlanOptions,
    plan_layer,
)

DENSE_HF: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 1000,
}
MOE_HF: dict[str, Any] = {
    **DENSE_HF,
    "num_hidden_layers": 2,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
}
ENABLED = {"enabled": True}
PACKAGES = (
    "vllm_ascend",
    "vllm_ascend.ops",
    "vllm_ascend.ops.fused_moe",
    "vllm_ascend.quantization",
    "vllm_ascend.quantization.methods",
    "vllm_ascend.worker",
)

# Fake vLLM-Ascend leaf modules: same names and signatures as HEAD, trivial bodies.
FAKE_SOURCES: dict[str, str] = {
    "vllm_ascend.quantization.methods.w8a8_static": """
        import torch

        class AscendW8A8LinearMethod:
            def apply(self, layer, x, bias=None, tp_rank=0):
                if x.dtype != torch.int8:
                    x = torch.ops.vllm.quantize(
                        x,
                        layer.aclnn_input_scale,
                        layer.aclnn_input_scale_reciprocal,
                        layer.aclnn_input_offset,
                    )
                return (x.float() @ layer.weight.float().t()) * layer.deq_scale
    """,
    "vllm_ascend.ops.linear": """
        import torch
        from vllm_ascend.quantization.methods.w8a8_static import AscendW8A8LinearMethod

        class _W8A8Linear(torch.nn.Module):
            def __init__(self, input_size, output_size, prefix=""):
                super().__init__()
                self.prefix = prefix
                self.weight = torch.nn.Parameter(
                    torch.randint(-4, 4, (output_size, input_size), dtype=torch.int8),
                    requires_grad=False,
                )
                self.aclnn_input_scale = torch.full((input_size,), 0.05)
                self.aclnn_input_scale_reciprocal = torch.full((input_size,), 20.0)
                self.aclnn_input_offset = torch.zeros(input_size)
                self.deq_scale = torch.full((output_size,), 0.001)
                self.quant_method = AscendW8A8LinearMethod()

            def forward(self, input_, **kwargs):
                return self.quant_method.apply(self, input_)

        class AscendQKVParallelLinear(_W8A8Linear):
            pass

        class AscendMergedColumnParallelLinear(_W8A8Linear):
            pass

        class AscendRowParallelLinear(_W8A8Linear):
            def forward(self, input_, **kwargs):
                return self.quant_method.apply(self, input_), None
    """,
    "vllm_ascend.ops.activation": """
        import torch

        class CustomOp(torch.nn.Module):
            # Like vLLM's CustomOp: the platform's forward is bound once, at construction.
            def __init__(self):
                super().__init__()
                self._forward_method = self.forward_oot

            def forward(self, *args, **kwargs):
                return self._forward_method(*args, **kwargs)

        class AscendSiluAndMul(CustomOp):
            def forward_oot(self, x):
                d = x.shape[-1] // 2
                return torch.nn.functional.silu(x[..., :d]) * x[..., d:]

        class AscendSiluAndMulWithClamp(CustomOp):
            def __init__(self, swiglu_limit=7.0):
                super().__init__()
                self.swiglu_limit = swiglu_limit

            def forward_oot(self, x):
                d = x.shape[-1] // 2
                gate = torch.clamp(x[..., :d], max=self.swiglu_limit)
                up = torch.clamp(x[..., d:], min=-self.swiglu_limit, max=self.swiglu_limit)
                return torch.nn.functional.silu(gate) * up
    """,
    "vllm_ascend.ops.fused_moe.moe_mlp": """
        import torch

        def quant_apply_mlp(hidden_states, w1, w1_scale, w2, w2_scale, group_list,
                            group_list_type=1, dynamic_scale=None, **kwargs):
            gate_up = hidden_states.float() @ w1[0].float().t()
            d = gate_up.shape[-1] // 2
            act = torch.nn.functional.silu(gate_up[:, :d]) * gate_up[:, d:]
            return (act @ w2[0].float().t()) * w2_scale

        def unified_apply_mlp(*, mlp_compute_input):
            m = mlp_compute_input
            return quant_apply_mlp(
                hidden_states=m.hidden_states, w1=m.w1, w1_scale=m.w1_scale, w2=m.w2,
                w2_scale=m.w2_scale, group_list=m.group_list,
            )
    """,
    "vllm_ascend.ops.fused_moe.routed_experts": """
        import torch
        from vllm_ascend.ops.fused_moe import moe_mlp

        class MoEMlpComputeInput:
            def __init__(self, **fields):
                for key, value in fields.items():
                    setattr(self, key, value)

        class AscendRoutedExperts(torch.nn.Module):
            def __init__(self, num_experts, hidden_size, intermediate_size, top_k, prefix=""):
                super().__init__()
                self.layer_name = prefix
                self.top_k = top_k
                self.w13_weight = torch.nn.Parameter(
                    torch.randint(-4, 4, (num_experts, 2 * intermediate_size, hidden_size),
                                  dtype=torch.int8), requires_grad=False)
                self.w2_weight = torch.nn.Parameter(
                    torch.randint(-4, 4, (num_experts, hidden_size, intermediate_size),
                                  dtype=torch.int8), requires_grad=False)

            def _select_experts(self, hidden_states, router_logits, enable_force_load_balance,
                                input_ids=None):
                weights, ids = torch.topk(router_logits.softmax(dim=-1), self.top_k)
                return weights.to(hidden_states.dtype), ids

            def forward(self, hidden_states, router_logits):
                _, topk_ids = self._select_experts(
                    hidden_states=hidden_states, router_logits=router_logits,
                    enable_force_load_balance=False)
                return moe_mlp.unified_apply_mlp(mlp_compute_input=MoEMlpComputeInput(
                    hidden_states=hidden_states, w1=self.w13_weight, w1_scale=None,
                    w2=self.w2_weight, w2_scale=0.001, group_list=topk_ids))
    """,
    "vllm_ascend.worker.worker": """
        class NPUWorker:
            def __init__(self, vllm_config, local_rank=0, rank=0, distributed_init_method="",
                         is_driver_worker=False, **kwargs):
                self.vllm_config = vllm_config
                self.local_rank = local_rank
                self.rank = rank
                self.model = None

            def load_model(self):
                # The test's vllm_config carries the model factory.
                self.model = self.vllm_config.build_model()

            def get_model(self):
                return self.model
    """,
}


def _module(name: str, *, package: bool = False, source: str | None = None) -> types.ModuleType:
    module = types.ModuleType(name)
    if package:
        module.__path__ = []
    if source is not None:
        exec(compile(textwrap.dedent(source), f"<fake {name}>", "exec"), module.__dict__)
    return module


def inject(monkeypatch: pytest.MonkeyPatch, name: str, module: types.ModuleType) -> None:
    monkeypatch.setitem(sys.modules, name, module)
    parent, _, leaf = name.rpartition(".")
    if parent in sys.modules:
        monkeypatch.setattr(sys.modules[parent], leaf, module, raising=False)


def fake_ascend_packages(monkeypatch: pytest.MonkeyPatch, *, native: bool = False) -> None:
    """Only the packages: enough for version detection and config checks (no torch)."""
    for name in PACKAGES:
        inject(monkeypatch, name, _module(name, package=True))
    if native:
        inject(monkeypatch, plugin.NATIVE_MODULE, _module(plugin.NATIVE_MODULE))


def _ensure_vllm_quantize() -> None:
    import torch

    if hasattr(torch.ops.vllm, "quantize"):
        return

    def quantize(x: Any, scale: Any, scale_reciprocal: Any, offset: Any) -> Any:
        return torch.clamp(torch.round(x * scale_reciprocal), -128, 127).to(torch.int8)

    op = torch.library.custom_op(
        "vllm::quantize",
        quantize,
        mutates_args=(),
        schema="(Tensor x, Tensor scale, Tensor scale_reciprocal, Tensor offset) -> Tensor",
    )
    op.register_fake(
        lambda x, scale, scale_reciprocal, offset: torch.empty_like(x, dtype=torch.int8)
    )


@pytest.fixture(autouse=True)
def clean_plugin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for var in (plugin.ENV_RUNTIME, plugin.ENV_MARKER_DIR, plugin.ENV_CAP_MIB):
        monkeypatch.delenv(var, raising=False)
    plugin.reset()
    yield
    plugin.reset()


@pytest.fixture
def torch_mod() -> Any:
    return pytest.importorskip("torch")


@pytest.fixture
def ascend(monkeypatch: pytest.MonkeyPatch, torch_mod: Any) -> SimpleNamespace:
    """The whole fake vLLM-Ascend (needs torch), plus a recording device for the runtime."""
    _ensure_vllm_quantize()
    fake_ascend_packages(monkeypatch)
    for name, source in FAKE_SOURCES.items():
        inject(monkeypatch, name, _module(name, source=source))
    recorder = hooks.RecordingDeviceOps()
    monkeypatch.setattr(hooks, "default_device_factory", lambda: recorder)
    modules = sys.modules
    return SimpleNamespace(
        recorder=recorder,
        NPUWorker=modules["vllm_ascend.worker.worker"].NPUWorker,
        linear=modules["vllm_ascend.ops.linear"],
        activation=modules["vllm_ascend.ops.activation"],
        experts=modules["vllm_ascend.ops.fused_moe.routed_experts"],
    )


# ----------------------------------------------------------------------------- the tiny model


def build_model(hf: dict[str, Any], *, plain_act_fn: bool = False) -> Any:
    """`model.model.layers[i].self_attn.{qkv_proj,o_proj}` and `mlp.{gate_up_proj,down_proj,
    act_fn}` (dense) or `mlp.{gate,experts}` (MoE), from the fake vLLM-Ascend classes."""
    import torch
    from vllm_ascend.ops.activation import AscendSiluAndMul  # type: ignore[import-not-found]
    from vllm_ascend.ops.fused_moe.routed_experts import (  # type: ignore[import-not-found]
        AscendRoutedExperts,
    )
    from vllm_ascend.ops.linear import (  # type: ignore[import-not-found]
        AscendMergedColumnParallelLinear,
        AscendQKVParallelLinear,
        AscendRowParallelLinear,
    )

    hidden, head_dim = hf["hidden_size"], hf["head_dim"]
    q_width = hf["num_attention_heads"] * head_dim
    kv_width = hf["num_key_value_heads"] * head_dim

    class PlainSiluAndMul(torch.nn.Module):
        def forward(self, x: Any) -> Any:
            d = x.shape[-1] // 2
            return torch.nn.functional.silu(x[..., :d]) * x[..., d:]

    class Attention(torch.nn.Module):
        def __init__(self, prefix: str) -> None:
            super().__init__()
            self.qkv_proj = AscendQKVParallelLinear(
                hidden, q_width + 2 * kv_width, prefix=f"{prefix}.qkv_proj"
            )
            self.o_proj = AscendRowParallelLinear(q_width, hidden, prefix=f"{prefix}.o_proj")

        def forward(self, x: Any) -> Any:
            attn = self.qkv_proj(x)[:, :q_width]
            out, _ = self.o_proj(attn)
            return out

    class MLP(torch.nn.Module):
        def __init__(self, prefix: str) -> None:
            super().__init__()
            inter = hf["intermediate_size"]
            self.gate_up_proj = AscendMergedColumnParallelLinear(
                hidden, 2 * inter, prefix=f"{prefix}.gate_up_proj"
            )
            self.down_proj = AscendRowParallelLinear(inter, hidden, prefix=f"{prefix}.down_proj")
            self.act_fn = PlainSiluAndMul() if plain_act_fn else AscendSiluAndMul()

        def forward(self, x: Any) -> Any:
            out, _ = self.down_proj(self.act_fn(self.gate_up_proj(x)))
            return out

    class SparseMoeBlock(torch.nn.Module):
        def __init__(self, prefix: str) -> None:
            super().__init__()
            self.gate = torch.nn.Linear(hidden, hf["num_experts"], bias=False)
            self.experts = AscendRoutedExperts(
                hf["num_experts"],
                hidden,
                hf["moe_intermediate_size"],
                hf["num_experts_per_tok"],
                prefix=f"{prefix}.experts",
            )

        def forward(self, x: Any) -> Any:
            return self.experts(x, self.gate(x))

    class DecoderLayer(torch.nn.Module):
        def __init__(self, i: int) -> None:
            super().__init__()
            prefix = f"model.layers.{i}"
            self.input_layernorm = torch.nn.LayerNorm(hidden)
            self.self_attn = Attention(f"{prefix}.self_attn")
            self.post_attention_layernorm = torch.nn.LayerNorm(hidden)
            is_moe = "num_experts" in hf
            self.mlp = SparseMoeBlock(f"{prefix}.mlp") if is_moe else MLP(f"{prefix}.mlp")

        def forward(self, x: Any) -> Any:
            x = x + self.self_attn(self.input_layernorm(x))
            return x + self.mlp(self.post_attention_layernorm(x))

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(
                DecoderLayer(i) for i in range(hf["num_hidden_layers"])
            )

        def forward(self, x: Any) -> Any:
            for layer in self.layers:
                x = layer(x)
            return x

    class ForCausalLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = Model()

        def forward(self, x: Any) -> Any:
            return self.model(x)

    return ForCausalLM()


def vllm_config(
    hf: dict[str, Any],
    wpc: Any = ENABLED,
    *,
    quantization: str | None = "ascend",
    factory: Callable[[], Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> SimpleNamespace:
    additional = dict(extra or {})
    if wpc is not None:
        additional["weight_prefetch_config"] = wpc
    return SimpleNamespace(
        additional_config=additional,
        model_config=SimpleNamespace(
            hf_config=dict(hf),
            quantization=quantization,
            model="/models/tiny",
            served_model_name=None,
        ),
        parallel_config=SimpleNamespace(
            tensor_parallel_size=1, data_parallel_size=1, enable_expert_parallel=False
        ),
        build_model=factory or (lambda: build_model(hf)),
    )


def load(ascend: SimpleNamespace, config: SimpleNamespace) -> Any:
    """What vLLM does in a worker: register the plugin, build the NPUWorker, load the model."""
    plugin.register()
    worker = ascend.NPUWorker(vllm_config=config, local_rank=0, rank=0)
    worker.load_model()
    return worker.get_model()


def run(model: Any, tokens: int, hidden: int = 64) -> None:
    import torch

    torch.manual_seed(tokens)
    with torch.inference_mode():
        model(torch.randn(tokens, hidden))


def planned(hf: dict[str, Any], wpc: Any, tokens: int, cap: int = DEFAULT_CAP_BYTES) -> LayerPlan:
    spec = spec_from_hf_config(hf, "tiny", "w8a8", "test")
    config = parse_weight_prefetch_config(wpc)
    return plan_layer(spec, Layout(), config, tokens, "plugin", PlanOptions(cap_bytes=cap))


def weight_of(layer: Any, name: str) -> Any:
    return {
        "qkv_proj": lambda: layer.self_attn.qkv_proj.weight,
        "o_proj": lambda: layer.self_attn.o_proj.weight,
        "gate_up_proj": lambda: layer.mlp.gate_up_proj.weight,
        "down_proj": lambda: layer.mlp.down_proj.weight,
        "experts.w13": lambda: layer.mlp.experts.w13_weight,
    }[name]()


def expected_starts(model: Any, plan: LayerPlan) -> list[tuple[str, int, int]]:
    return [
        (op.knob, id(weight_of(layer, op.weight)), op.bytes)
        for layer in model.model.layers
        for op in plan.firing
    ]


def recorded_starts(recorder: hooks.RecordingDeviceOps) -> list[tuple[str, int, int]]:
    return [(str(e.knob), id(e.weight), e.nbytes) for e in recorder.starts()]


def assert_all_joined(recorder: hooks.RecordingDeviceOps) -> None:
    """Every start is joined (FIFO per knob) before the forward ends, and nothing is pending."""
    pending: list[str] = []
    for event in recorder.events:
        if event.kind == "start":
            pending.append(str(event.knob))
        else:
            assert event.knob in pending, f"join of {event.knob} without a start"
            pending.remove(str(event.knob))
    assert pending == []
    runtime = hooks.active()
    assert runtime is not None and runtime.pending == []


def sequence(recorder: hooks.RecordingDeviceOps) -> list[str]:
    return [f"{e.kind} {e.knob}" for e in recorder.events]


# ------------------------------------------------------------------------- no torch needed


def test_entry_point_visible_through_importlib_metadata() -> None:
    eps = importlib.metadata.entry_points(group=plugin.ENTRY_POINT_GROUP)
    found = [ep for ep in eps if ep.name == plugin.ENTRY_POINT_NAME]
    assert len(found) == 1, "pip install -e . (or pip install .) registers the entry point"
    assert found[0].value == plugin.ENTRY_POINT_VALUE
    assert found[0].load() is plugin.register


@pytest.mark.parametrize(
    ("version", "native_module", "verdict"),
    [
        ("0.24.0rc1", False, "plugin"),
        ("0.25.1rc1", False, "plugin"),
        ("0.26.1.dev12+g182b75e", False, "plugin"),
        (None, False, "plugin"),
        ("0.23.0", True, "native"),
        ("0.23.0", False, "native"),
        ("0.15.0rc1", False, "native"),
        ("0.18.0", True, "native"),
        ("0.23.1.dev3+gabc", True, "native"),
        (None, True, "native"),
        ("0.14.0rc1", True, "unsupported"),
        ("0.11.0", True, "unsupported"),
        ("0.9.1", False, "unsupported"),
    ],
)
def test_classify_versions(version: str | None, native_module: bool, verdict: str) -> None:
    assert plugin.classify_runtime(version, native_module)[0] == verdict


def test_classify_absent_and_reasons() -> None:
    assert plugin.classify_runtime(None, False, importable=False) == (
        "absent",
        "vllm-ascend is not installed",
    )
    assert "older than v0.15.0rc1" in plugin.classify_runtime("0.13.0", True)[1]
    assert plugin.parse_version("0.24.0rc1") < plugin.parse_version("0.24.0")  # type: ignore[operator]
    assert plugin.parse_version("0.24.0.dev1") < plugin.parse_version("0.24.0rc1")  # type: ignore[operator]
    assert plugin.parse_version("not a version") is None


def test_register_is_cheap_and_imports_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "from prefetch_tune.runtime.plugin import register, status\n"
        "register(); register()\n"
        "print(sorted(m for m in ('torch', 'vllm', 'vllm_ascend', 'pandas', 'optuna')"
        " if sys.modules.get(m) is not None), status().state)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFETCH_TUNE_")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.split() == ["[]", "skipped"]  # no vllm-ascend here: nothing to do


def test_register_without_vllm_ascend_installs_nothing() -> None:
    plugin.register()
    assert plugin.status().state == "skipped"
    assert hooks.installed_hooks() == []


def test_register_twice_arms_once(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_ascend_packages(monkeypatch)
    finders_before = list(sys.meta_path)
    plugin.register()
    plugin.register()
    added = [f for f in sys.meta_path if f not in finders_before]
    assert len(added) == 1  # the post-import hook on vllm_ascend.worker.worker, once
    assert plugin.status().state == "armed"
    assert plugin.status().worker is False
    assert hooks.installed_hooks() == []  # a non-worker process installs nothing


def test_native_support_installs_nothing_and_says_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake_ascend_packages(monkeypatch, native=True)
    caplog.set_level(logging.INFO, logger="vllm.prefetch_tune")
    meta_path = list(sys.meta_path)
    plugin.register()
    assert plugin.status().state == "native"
    assert "native weight prefetch" in plugin.status().reason
    assert "vllm_ascend.ops.weight_prefetch" in caplog.text
    assert sys.meta_path == meta_path
    assert hooks.installed_hooks() == []


def test_runtime_off(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_ascend_packages(monkeypatch)
    monkeypatch.setenv(plugin.ENV_RUNTIME, "off")
    meta_path = list(sys.meta_path)
    plugin.register()
    assert plugin.status().state == "off"
    assert sys.meta_path == meta_path


def test_runtime_env_typo_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(plugin.ENV_RUNTIME, "of")
    with pytest.raises(ConfigError, match="PREFETCH_TUNE_RUNTIME=of"):
        plugin.register()


class WorkerWrapperBase:
    """Stands in for vLLM's: init_worker calls the general plugins with vllm_config in scope."""

    def init_worker(self, all_kwargs: list[dict[str, Any]]) -> None:
        kwargs = all_kwargs[0]
        vllm_config = kwargs.get("vllm_config")
        assert vllm_config is not None
        plugin.register()


@pytest.mark.parametrize(
    ("wpc", "key"),
    [
        ({"enable": True}, r"weight_prefetch_config\.enable: unknown key, did you mean 'enabled'"),
        (
            {"enabled": True, "prefetch_ratio": {"mlp": {"down": 1.5}}},
            r"weight_prefetch_config\.prefetch_ratio\.mlp\.down: 1\.5 is outside",
        ),
        (
            {"enabled": True, "prefetch_ratio": {"mpl": {}}},
            r"weight_prefetch_config\.prefetch_ratio\.mpl: unknown key",
        ),
    ],
)
def test_invalid_config_stops_the_worker(
    monkeypatch: pytest.MonkeyPatch, wpc: dict[str, Any], key: str
) -> None:
    fake_ascend_packages(monkeypatch)
    config = vllm_config(DENSE_HF, wpc)
    with pytest.raises(ConfigError, match=key):
        WorkerWrapperBase().init_worker([{"vllm_config": config}])


def test_root_key_typo_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_ascend_packages(monkeypatch)
    config = vllm_config(DENSE_HF, None, extra={"weight_prefetch_confg": {"enabled": True}})
    with pytest.raises(ConfigError, match="weight_prefetch_confg"):
        WorkerWrapperBase().init_worker([{"vllm_config": config}])


def test_disabled_config_in_a_worker_stays_inactive(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_ascend_packages(monkeypatch)
    monkeypatch.setenv(plugin.ENV_MARKER_DIR, str(tmp_path))
    WorkerWrapperBase().init_worker([{"vllm_config": vllm_config(DENSE_HF, None)}])
    assert plugin.status().state == "inactive"
    assert plugin.status().worker is True
    marker = json.loads((tmp_path / f"prefetch-tune-{os.getpid()}.json").read_text())
    assert marker["state"] == "inactive"
    assert marker["config"] == {"enabled": False}


def test_unsupported_model_stays_inactive_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    mla = {**DENSE_HF, "kv_lora_rank": 512}
    assert plugin.activate(vllm_config(mla)) is None
    assert plugin.status().state == "inactive"
    assert "MLA models" in plugin.status().reason
    assert "cannot plan for this model" in caplog.text
    assert hooks.installed_hooks() == []


def test_post_import_hook_patches_the_worker_in_process(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Uni-process executor: register() runs before any worker; the first import of
    vllm_ascend.worker.worker then wraps NPUWorker.load_model."""
    root = tmp_path / "vllm_ascend"
    (root / "worker").mkdir(parents=True)
    (root / "worker" / "__init__.py").write_text("")
    (root / "worker" / "worker.py").write_text(
        "class NPUWorker:\n    def load_model(self):\n        return 'loaded'\n"
    )
    package = _module("vllm_ascend", package=True)
    package.__path__ = [str(root)]
    monkeypatch.setitem(sys.modules, "vllm_ascend", package)
    try:
        plugin.register()
        assert plugin.status().state == "armed"
        module = importlib.import_module("vllm_ascend.worker.worker")
        assert hasattr(module.NPUWorker.load_model, hooks.HOOK_MARK)
        assert not any(isinstance(f, plugin._PostImportFinder) for f in sys.meta_path)
    finally:
        for name in ("vllm_ascend.worker.worker", "vllm_ascend.worker"):
            sys.modules.pop(name, None)


# ------------------------------------------------------------------------------ with torch


@pytest.mark.torch
def test_dense_prefetches_equal_the_plan(
    ascend: SimpleNamespace,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO, logger="vllm.prefetch_tune")
    monkeypatch.setenv(plugin.ENV_MARKER_DIR, str(tmp_path))
    model = load(ascend, vllm_config(DENSE_HF))
    tokens = 8
    run(model, tokens)
    plan = planned(DENSE_HF, ENABLED, tokens)
    assert [op.knob for op in plan.firing] == ["attn.qkv", "attn.o", "mlp.gate_up", "mlp.down"]
    assert recorded_starts(ascend.recorder) == expected_starts(model, plan)
    one_layer = [
        "start attn.qkv",
        "join attn.qkv",
        "start attn.o",
        "join attn.o",
        "start mlp.gate_up",
        "start mlp.down",
        "join mlp.gate_up",
        "join mlp.down",
    ]
    assert sequence(ascend.recorder) == one_layer * DENSE_HF["num_hidden_layers"]
    assert_all_joined(ascend.recorder)
    first = ascend.recorder.starts()[0]
    assert first.dependency.shape == (tokens, DENSE_HF["hidden_size"])  # the layer input
    # proof of activity: one log line and a marker per worker
    assert "prefetch-tune runtime: active, 6 hooks, semantics plugin, config {" in caplog.text
    marker = json.loads((tmp_path / f"prefetch-tune-{os.getpid()}.json").read_text())
    assert marker["state"] == "active"
    assert len(marker["hooks_installed"]) == 6 and marker["hooks_missing"] == {}
    assert marker["indexed_layers"] == DENSE_HF["num_hidden_layers"]
    assert marker["config"]["enabled"] is True
    assert marker["versions"]["prefetch-tune"]
    assert marker["rank"] == 0


@pytest.mark.torch
def test_mlp_threshold(ascend: SimpleNamespace) -> None:
    model = load(ascend, vllm_config(DENSE_HF))
    for tokens in (MLP_TOKEN_LIMIT - 1, MLP_TOKEN_LIMIT):
        ascend.recorder.clear()
        run(model, tokens)
        plan = planned(DENSE_HF, ENABLED, tokens)
        assert recorded_starts(ascend.recorder) == expected_starts(model, plan)
        assert_all_joined(ascend.recorder)
        knobs = {e.knob for e in ascend.recorder.starts()}
        assert ("mlp.down" in knobs) is (tokens < MLP_TOKEN_LIMIT)
        assert "attn.qkv" in knobs


@pytest.mark.torch
def test_moe_prefetches_its_own_w13_from_96_tokens(ascend: SimpleNamespace) -> None:
    model = load(ascend, vllm_config(MOE_HF))
    for tokens in (MOE_TOKEN_MIN - 1, MOE_TOKEN_MIN, 200):
        ascend.recorder.clear()
        run(model, tokens)
        plan = planned(MOE_HF, ENABLED, tokens)
        assert recorded_starts(ascend.recorder) == expected_starts(model, plan)
        assert_all_joined(ascend.recorder)
        moe = [e for e in ascend.recorder.starts() if e.knob == "moe.gate_up"]
        if tokens < MOE_TOKEN_MIN:
            assert moe == []
        else:
            layers = model.model.layers
            assert [e.weight for e in moe] == [layer.mlp.experts.w13_weight for layer in layers]
            assert sequence(ascend.recorder) == [
                "start attn.qkv",
                "join attn.qkv",
                "start attn.o",
                "join attn.o",
                "start moe.gate_up",
                "join moe.gate_up",
            ] * len(layers)


@pytest.mark.torch
def test_bytes_are_capped_as_planned(
    ascend: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(plugin.ENV_CAP_MIB, "0.005")
    cap = int(0.005 * 1024 * 1024)
    model = load(ascend, vllm_config(DENSE_HF))
    run(model, 4)
    plan = planned(DENSE_HF, ENABLED, 4, cap=cap)
    assert any(op.capped for op in plan.firing)
    assert recorded_starts(ascend.recorder) == expected_starts(model, plan)
    assert max(e.nbytes for e in ascend.recorder.starts()) == cap


@pytest.mark.torch
def test_ratios_and_zero_knobs(ascend: SimpleNamespace) -> None:
    wpc = {
        "enabled": True,
        "prefetch_ratio": {"attn": {"qkv": 0.0, "o": 0.5}, "mlp": {"gate_up": 0.0, "down": 0.25}},
    }
    model = load(ascend, vllm_config(DENSE_HF, wpc))
    run(model, 16)
    plan = planned(DENSE_HF, wpc, 16)
    assert recorded_starts(ascend.recorder) == expected_starts(model, plan)
    assert {e.knob for e in ascend.recorder.starts()} == {"attn.o", "mlp.down"}
    assert_all_joined(ascend.recorder)


@pytest.mark.torch
def test_nothing_recorded_when_disabled(ascend: SimpleNamespace) -> None:
    for wpc in ({"enabled": False}, None):
        plugin.reset()
        model = load(ascend, vllm_config(DENSE_HF, wpc))
        run(model, 8)
        assert ascend.recorder.events == []
        assert plugin.status().state == "inactive"
        assert hooks.installed_hooks() == []


@pytest.mark.torch
def test_register_twice_installs_once(ascend: SimpleNamespace) -> None:
    plugin.register()
    plugin.register()
    worker = ascend.NPUWorker(vllm_config=vllm_config(DENSE_HF))
    worker.load_model()
    worker.load_model()  # a second load re-indexes; nothing is wrapped twice
    load_model = ascend.NPUWorker.load_model
    assert not hasattr(getattr(load_model, hooks.HOOK_MARK), hooks.HOOK_MARK)
    forward_oot = ascend.activation.AscendSiluAndMul.forward_oot
    assert not hasattr(getattr(forward_oot, hooks.HOOK_MARK), hooks.HOOK_MARK)
    assert len(hooks.installed_hooks()) == 6
    run(worker.get_model(), 8)
    assert len(ascend.recorder.starts()) == 4 * DENSE_HF["num_hidden_layers"]


@pytest.mark.torch
def test_non_worker_register_installs_nothing(ascend: SimpleNamespace) -> None:
    plugin.register()
    assert plugin.status().state == "armed"
    assert hooks.installed_hooks() == []
    assert not hasattr(ascend.activation.AscendSiluAndMul.forward_oot, hooks.HOOK_MARK)
    assert not hasattr(ascend.linear.AscendRowParallelLinear.forward, hooks.HOOK_MARK)


@pytest.mark.torch
def test_force_installs_despite_native(
    ascend: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    inject(monkeypatch, plugin.NATIVE_MODULE, _module(plugin.NATIVE_MODULE))
    plugin.register()
    assert plugin.status().state == "native"
    plugin.reset()
    monkeypatch.setenv(plugin.ENV_RUNTIME, "force")
    model = load(ascend, vllm_config(DENSE_HF))
    assert plugin.status().state == "active"
    run(model, 8)
    assert len(ascend.recorder.starts()) == 4 * DENSE_HF["num_hidden_layers"]


@pytest.mark.torch
def test_missing_hook_point_warns_once_and_others_install(
    ascend: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delattr(ascend.activation, "AscendSiluAndMulWithClamp")
    caplog.set_level(logging.INFO, logger="vllm.prefetch_tune")
    model = load(ascend, vllm_config(DENSE_HF))
    missing = "vllm_ascend.ops.activation:AscendSiluAndMulWithClamp.forward_oot"
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([line for line in lines if missing in line]) == 1
    assert plugin.status().hooks_missing.keys() == {missing}
    assert len(plugin.status().hooks_installed) == 5
    run(model, 8)
    assert recorded_starts(ascend.recorder) == expected_starts(model, planned(DENSE_HF, ENABLED, 8))


@pytest.mark.torch
def test_no_start_without_a_reachable_join(
    ascend: SimpleNamespace, caplog: pytest.LogCaptureFixture
) -> None:
    """A layer whose activation is not a hooked SwiGLU never joins at swiglu, so its
    mlp prefetches are not started (a dangling start would fail ACL graph capture)."""
    config = vllm_config(DENSE_HF, factory=lambda: build_model(DENSE_HF, plain_act_fn=True))
    model = load(ascend, config)
    run(model, 8)
    assert {e.knob for e in ascend.recorder.starts()} == {"attn.qkv", "attn.o"}
    assert_all_joined(ascend.recorder)
    assert "mlp.gate_up not started in layer 0" in caplog.text


@pytest.mark.torch
def test_hooks_installed_after_the_model_was_built_do_nothing(ascend: SimpleNamespace) -> None:
    """CustomOps bind forward_oot when built: the index notices the stale binding."""
    model = build_model(DENSE_HF)  # built before any hook
    runtime = plugin.activate(vllm_config(DENSE_HF), model)
    assert runtime is not None
    run(model, 8)
    assert {e.knob for e in ascend.recorder.starts()} == {"attn.qkv", "attn.o"}
    assert_all_joined(ascend.recorder)


@pytest.mark.torch
def test_runtime_uses_forward_context_tokens(ascend: SimpleNamespace) -> None:
    model = load(ascend, vllm_config(DENSE_HF))
    runtime = hooks.active()
    assert runtime is not None
    runtime.tokens_fn = lambda: MLP_TOKEN_LIMIT  # padded batch from vLLM's forward context
    run(model, 8)
    assert {e.knob for e in ascend.recorder.starts()} == {"attn.qkv", "attn.o"}


@pytest.mark.torch
@pytest.mark.parametrize(("hf", "tokens"), [(DENSE_HF, 8), (MOE_HF, 120)], ids=["dense", "moe"])
def test_ops_survive_graph_capture_and_dce(
    ascend: SimpleNamespace, hf: dict[str, Any], tokens: int
) -> None:
    """Compiled with AOT autograd plus dead-code elimination, the same prefetches run."""
    import torch
    from torch._dynamo.backends.common import aot_autograd

    seen: list[str] = []

    def compiler(gm: Any, example_inputs: Any) -> Any:
        gm.graph.eliminate_dead_code()
        gm.recompile()
        seen.extend(str(node.target) for node in gm.graph.nodes)
        return gm

    model = load(ascend, vllm_config(hf))
    run(model, tokens)
    eager = sequence(ascend.recorder)
    assert eager
    ascend.recorder.clear()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=compiler), fullgraph=True)
    try:
        run(compiled, tokens)
    finally:
        torch._dynamo.reset()
    assert "prefetch_tune.prefetch_start.default" in seen
    assert "prefetch_tune.prefetch_join.default" in seen
    assert sequence(ascend.recorder) == eager
    assert_all_joined(ascend.recorder)


@pytest.mark.torch
def test_npu_device_ops_issue_side_stream_prefetch(monkeypatch: pytest.MonkeyPatch) -> None:
    """NpuDeviceOps against a fake torch_npu: wait, prefetch on the side stream, join."""
    calls: list[tuple[Any, ...]] = []

    class Stream:
        def __init__(self, name: str) -> None:
            self.name = name

        def wait_stream(self, other: Stream) -> None:
            calls.append(("wait", self.name, other.name))

    compute = Stream("compute")

    class StreamContext:
        def __init__(self, stream: Stream) -> None:
            self.stream = stream

        def __enter__(self) -> None:
            calls.append(("enter", self.stream.name))

        def __exit__(self, *exc: object) -> None:
            calls.append(("exit", self.stream.name))

    npu = SimpleNamespace(
        current_device=lambda: 0,
        current_stream=lambda: compute,
        Stream=lambda: Stream("side"),
        stream=StreamContext,
    )

    def npu_prefetch(weight: Any, dependency: Any, nbytes: int, offset: int) -> None:
        calls.append(("prefetch", weight, dependency, nbytes, offset))

    monkeypatch.setitem(
        sys.modules, "torch_npu", SimpleNamespace(npu=npu, npu_prefetch=npu_prefetch)
    )
    device = hooks.NpuDeviceOps()
    device.prepare()  # at model load: the side stream exists before any graph capture
    side = device._streams[0]
    device.start("W", "dep", 1024, "mlp.down")
    device.join("mlp.down")
    assert device._streams == {0: side}
    assert calls == [
        ("wait", "side", "compute"),
        ("enter", "side"),
        ("prefetch", "W", "dep", 1024, 0),
        ("exit", "side"),
        ("wait", "compute", "side"),
    ]
