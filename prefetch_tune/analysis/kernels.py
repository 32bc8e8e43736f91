"""Kernel categories of a torch_npu profile: what kind of device task a name/op type names.

Prefetch tasks are tasks whose name or task type matches `cmo|prefetch` (case-insensitive);
the compute stream is the stream with the most compute kernels (matmuls, vector ops, attention).
"""

from __future__ import annotations

import re

# ---------------------------------------------------------------- task categories

PREFETCH, WAIT, SYNC, COMM, MATMUL, ATTN, GATING, SWIGLU, NORM, NORM_QUANT, QUANT, OTHER = range(12)
CATEGORY_NAMES = (
    "prefetch",
    "wait",
    "sync",
    "comm",
    "matmul",
    "attention",
    "gating",
    "swiglu",
    "norm",
    "norm+quant",
    "quant",
    "other",
)
COMPUTE_CATS = frozenset({MATMUL, ATTN, GATING, SWIGLU, NORM, NORM_QUANT, QUANT})
VECTOR_CATS = frozenset({GATING, SWIGLU, NORM, NORM_QUANT, QUANT})

_PREFETCH_RE = re.compile(r"cmo|prefetch", re.IGNORECASE)
_MATMUL_RE = re.compile(r"mat_?mul|gemm")
_GATING_RE = re.compile(r"gating|topk")
_SWIGLU_RE = re.compile(r"swi_?glu")
_NORM_RE = re.compile(r"rms_?norm|layer_?norm")
_ATTN_RE = re.compile(r"attention|flash|attn")
_COMM_RE = re.compile(r"^hcom|hccl|all_?reduce|all_?to_?all|all_?gather|reduce_?scatter")


def kernel_category(name: str, op_type: str = "", task_type: str = "") -> int:
    """The category of one device task from its name, op type and task type (case-insensitive).

    The op type (kernel_details `Type`) decides when given; a trace_view name such as
    `AddRmsNorm_post_attention_layernorm` is read with norm before attention for that reason.
    """
    if any(_PREFETCH_RE.search(s) for s in (name, op_type, task_type) if s):
        return PREFETCH
    tt = task_type.lower()
    key = (op_type or name).lower()
    if "event_wait" in tt or "event_wait" in key:
        return WAIT
    if "event_record" in tt or "event_record" in key:
        return SYNC
    if tt in ("communication", "hccl") or _COMM_RE.search(key):
        return COMM
    if _MATMUL_RE.search(key):
        return MATMUL
    if _GATING_RE.search(key):
        return GATING
    if _SWIGLU_RE.search(key):
        return SWIGLU
    if _NORM_RE.search(key):
        return NORM_QUANT if "quant" in key else NORM
    if _ATTN_RE.search(key):
        return ATTN
    if "quant" in key:
        return QUANT
    return OTHER
