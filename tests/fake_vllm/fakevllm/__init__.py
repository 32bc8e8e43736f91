"""A fake `vllm` CLI for tests: real processes, real HTTP, no NPU and no model.

Tests put `tests/fake_vllm/` first on PATH, so `vllm serve ...` and `vllm bench serve ...`
run this instead of vLLM. Both parse their flags with argparse like the real CLI (an unknown
flag exits 2 with "unrecognized arguments"; a bad `--additional-config` JSON exits 2 too).

`vllm serve MODEL [flags]` listens at once; /health answers 503 until the start-up delay has
passed, then 200. /v1/models, /tokenize and POST /v1/completions (streaming SSE or not) work.
It spawns one "engine core" child in its own process group, which outlives a crashed parent by
FAKE_VLLM_ORPHAN_LINGER seconds, so tests can check that the whole group is stopped.
Token timing comes from `fakevllm.timing.serving_timing(...)` unless overridden;
without both overrides the simulator is asked once at start-up, and if it refuses the model or
config the server exits 1 with its traceback, as vLLM does when it cannot load a model.
At most --max-num-seqs requests run at once; the rest queue (their TTFT grows).

`vllm bench serve [flags]` drives the server with a streaming HTTP client (threads +
http.client), --max-concurrency in flight, --num-warmups unmeasured first, and with
--save-result writes vLLM's result JSON (same keys). Exits 1 if no request completed.

`vllm --version` prints FAKE_VLLM_VERSION.

Environment variables (all optional):

FAKE_VLLM_VERSION                 version printed by `vllm --version` (default 0.23.0)
FAKE_VLLM_TTFT_MS                 time to first token in ms (default: from the simulator)
FAKE_VLLM_TPOT_MS                 time per output token in ms (default: from the simulator)
FAKE_VLLM_TIME_SCALE              multiplies TTFT and TPOT (default 1.0), so tests run fast
FAKE_VLLM_STARTUP_DELAY           seconds until /health turns 200 (default 0)
FAKE_VLLM_CRASH_AT_START=1        log a traceback and exit 1 after the start-up delay
FAKE_VLLM_OOM=1                   log a realistic NPU out-of-memory error, exit 1 (after delay)
FAKE_VLLM_HANG=1                  never become healthy (/health stays 503)
FAKE_VLLM_CRASH_AFTER_REQUESTS=N  die (exit 1, no clean-up) once N completion requests have
                                  finished; N=0 dies on the first one: a crash mid-benchmark
FAKE_VLLM_IGNORE_SIGTERM=1        the server and its engine ignore SIGTERM (needs SIGKILL)
FAKE_VLLM_EOS_AFTER=K             without ignore_eos, stop after K tokens (default: a
                                  prompt-dependent position in 1..max_tokens)
FAKE_VLLM_ORPHAN_LINGER           seconds the engine child lives on after its parent died
                                  (default 60)
FAKE_VLLM_READY_FILE=PATH         JSON file of first-occurrence instants (time.monotonic(), a
                                  system-wide clock on Linux): "ready" (the server became
                                  ready: /health would answer 200 from then on), "health_ok"
                                  (first /health 200 actually served) and "first:<METHOD>
                                  <path>" for every other request path
"""

DEFAULT_VERSION = "0.23.0"
