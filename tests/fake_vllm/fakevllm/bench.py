"""`vllm bench serve` stand-in: a real streaming client that saves vLLM's result JSON.

Per request it measures what vLLM measures: TTFT (first content chunk), ITL (gaps between
chunks), TPOT ((latency - TTFT) / (output tokens - 1)) and E2EL (last chunk - start); failed
requests (HTTP error, reset connection, stream without [DONE]) count in `failed`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import random
import statistics
import sys
import threading
import time
import urllib.parse
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

DATASETS = [
    "sharegpt",
    "burstgpt",
    "sonnet",
    "random",
    "random-mm",
    "random-rerank",
    "hf",
    "custom",
    "prefix_repetition",
    "spec_bench",
    "txt-slices",
]
BACKENDS = [
    "vllm",
    "openai",
    "openai-chat",
    "openai-audio",
    "openai-embeddings",
    "sglang",
    "tgi",
    "lmdeploy",
    "deepspeed-mii",
    "tensorrt-llm",
    "scalellm",
    "llama.cpp",
]
COMPLETION_BACKENDS = ("vllm", "openai", "sglang", "lmdeploy", "scalellm", "llama.cpp")
REQUEST_TIMEOUT = 6 * 3600.0  # as aiohttp's in vLLM: a request is never cut short by the client


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm bench serve", description="Fake serving benchmark.")
    p.add_argument("--backend", choices=BACKENDS, default="openai")
    p.add_argument("--base-url", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--model", default=None)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--dataset-name", choices=DATASETS, default="random")
    p.add_argument("--dataset-path", default=None)
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--random-prefix-len", type=int, default=0)
    p.add_argument("--input-len", type=int, default=None)
    p.add_argument("--output-len", type=int, default=None)
    p.add_argument("--request-rate", type=float, default=float("inf"))
    p.add_argument("--burstiness", type=float, default=1.0)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--num-warmups", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--extra-body", type=json.loads, default=None)
    p.add_argument("--percentile-metrics", default="ttft,tpot,itl")
    p.add_argument("--metric-percentiles", default="99")
    p.add_argument("--goodput", nargs="+", default=None)
    p.add_argument("--save-result", action="store_true")
    p.add_argument("--save-detailed", action="store_true")
    p.add_argument("--append-result", action="store_true")
    p.add_argument("--result-dir", default=None)
    p.add_argument("--result-filename", default=None)
    p.add_argument("--label", default=None)
    p.add_argument("--metadata", nargs="*", default=None)
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--ready-check-timeout-sec", type=int, default=0)
    return p


@dataclass
class Request:
    prompt: str
    prompt_len: int
    output_len: int


@dataclass
class Output:
    prompt_len: int
    success: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    generated: str = ""
    error: str = ""
    submitted: float = 0.0
    start: float = 0.0
    end: float = 0.0
    token_times: list[float] = field(default_factory=list)


class Target:
    """Where requests go: host, port and paths from --base-url/--host/--port/--endpoint."""

    def __init__(self, args: argparse.Namespace) -> None:
        if args.base_url:
            url = urllib.parse.urlsplit(args.base_url)
            self.host = url.hostname or "127.0.0.1"
            self.port = url.port or (443 if url.scheme == "https" else 80)
            self.prefix = url.path.rstrip("/")
        else:
            self.host, self.port, self.prefix = args.host, args.port, ""
        self.endpoint = self.prefix + args.endpoint

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request("GET", self.prefix + path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()


def make_requests(args: argparse.Namespace, count: int, rng: random.Random) -> list[Request]:
    """Random prompts, one token per word, lengths spread by --random-range-ratio."""
    in_len = args.input_len if args.input_len is not None else args.random_input_len
    out_len = args.output_len if args.output_len is not None else args.random_output_len
    ratio = args.random_range_ratio
    prefix = [f"p{rng.randrange(50000)}" for _ in range(args.random_prefix_len)]

    def spread(n: int) -> int:
        low, high = math.floor(n * (1 - ratio)), math.ceil(n * (1 + ratio))
        return max(1, rng.randint(low, high))

    requests = []
    for _ in range(count):
        n_in = spread(in_len)
        words = prefix + [f"w{rng.randrange(50000)}" for _ in range(n_in)]
        requests.append(Request(" ".join(words), len(words), spread(out_len)))
    return requests


def send(target: Target, req: Request, args: argparse.Namespace, model: str) -> Output:
    """One streaming completion, timed chunk by chunk (perf_counter)."""
    out = Output(prompt_len=req.prompt_len)
    payload: dict[str, Any] = {
        "model": model,
        "prompt": req.prompt,
        "max_tokens": req.output_len,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.ignore_eos:
        payload["ignore_eos"] = True
    for key in ("temperature", "top_p", "top_k", "min_p"):
        if getattr(args, key) is not None:
            payload[key] = getattr(args, key)
    if args.extra_body:
        payload.update(args.extra_body)
    conn = http.client.HTTPConnection(target.host, target.port, timeout=REQUEST_TIMEOUT)
    out.start = time.perf_counter()
    try:
        conn.request(
            "POST",
            target.endpoint,
            body=json.dumps(payload),
            headers={"Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        if resp.status != 200:
            out.error = f"HTTP {resp.status}: {resp.read()[:300].decode('utf-8', 'replace')}"
            return out
        last = out.start
        done = False
        usage_tokens = None
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                continue
            now = time.perf_counter()
            chunk = json.loads(data)
            choices = chunk.get("choices") or []
            text = choices[0].get("text") if choices else None
            if text:
                if out.ttft == 0.0:
                    out.ttft = now - out.start
                else:
                    out.itl.append(now - last)
                last = now
                out.generated += text
                out.token_times.append(now)
            usage = chunk.get("usage")
            if usage:
                usage_tokens = usage.get("completion_tokens")
        if not done or not out.token_times:
            out.error = "stream ended before [DONE]" if not done else "no content received"
            return out
        out.latency = last - out.start
        out.end = last
        out.output_tokens = int(usage_tokens) if usage_tokens else len(out.token_times)
        out.success = True
    except Exception as exc:  # any transport error is one failed request, as in vLLM
        out.error = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    return out


def run_requests(
    target: Target,
    requests: list[Request],
    args: argparse.Namespace,
    model: str,
    rng: random.Random,
) -> list[Output]:
    """Send all requests with at most --max-concurrency in flight, at --request-rate."""
    limit = args.max_concurrency or len(requests) or 1
    outputs: list[Output] = []
    lock = threading.Lock()

    def job(req: Request, submitted: float) -> Output:
        out = send(target, req, args, model)
        out.submitted = submitted
        with lock:
            outputs.append(out)
        return out

    with ThreadPoolExecutor(max_workers=min(limit, 1024)) as pool:
        futures: list[Future[Output]] = []
        for req in requests:
            if math.isfinite(args.request_rate) and futures:
                theta = 1.0 / (args.request_rate * args.burstiness)
                time.sleep(rng.gammavariate(args.burstiness, theta))
            futures.append(pool.submit(job, req, time.perf_counter()))
        return [f.result() for f in futures]


def _percentile(values: list[float], p: float) -> float:
    """numpy's default (linear) percentile."""
    if not values:
        return 0.0
    data = sorted(values)
    k = (len(data) - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def _stats(name: str, values_s: list[float], percentiles: list[float]) -> dict[str, float]:
    ms = [v * 1000.0 for v in values_s]
    result = {
        f"mean_{name}_ms": statistics.fmean(ms) if ms else 0.0,
        f"median_{name}_ms": statistics.median(ms) if ms else 0.0,
        f"std_{name}_ms": statistics.pstdev(ms) if ms else 0.0,
    }
    for p in percentiles:
        word = str(int(p)) if int(p) == p else str(p)
        result[f"p{word}_{name}_ms"] = _percentile(ms, p)
    return result


def _goodput(outs: list[Output], specs: list[str] | None) -> int | None:
    if not specs:
        return None
    limits = {}
    for spec in specs:
        key, _, value = spec.partition(":")
        limits[key] = float(value) / 1000.0
    good = 0
    for out in outs:
        tpot = (out.latency - out.ttft) / (out.output_tokens - 1) if out.output_tokens > 1 else 0
        measured = {"ttft": out.ttft, "tpot": tpot, "e2el": out.latency}
        if all(measured.get(k, 0.0) <= v for k, v in limits.items()):
            good += 1
    return good


def compute(
    args: argparse.Namespace, outs: list[Output], duration: float, bench_start: float
) -> dict[str, Any]:
    ok = [o for o in outs if o.success]
    total_in = sum(o.prompt_len for o in ok)
    total_out = sum(o.output_tokens for o in ok)
    percentiles = [float(p) for p in args.metric_percentiles.split(",") if p.strip()]
    selected = [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]
    per_second: dict[int, int] = {}
    for o in ok:
        for t in o.token_times:
            second = int(t - bench_start)
            per_second[second] = per_second.get(second, 0) + 1
    events = sorted(
        [(o.start, 1) for o in outs] + [(o.end or o.start, -1) for o in outs],
        key=lambda e: (e[0], e[1]),
    )
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    good = _goodput(ok, args.goodput)
    result: dict[str, Any] = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(outs) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "request_goodput": good / duration if good is not None else None,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
    }
    if args.save_detailed:
        result.update(
            {
                "input_lens": [o.prompt_len for o in outs],
                "output_lens": [o.output_tokens for o in outs],
                "ttfts": [o.ttft for o in outs],
                "itls": [o.itl for o in outs],
                "start_times": [o.start - bench_start for o in outs],
                "generated_texts": [o.generated for o in outs],
                "errors": [o.error for o in outs],
            }
        )
    result.update(
        {
            "latencies": [o.latency for o in outs],
            "queue_times": [max(0.0, o.start - o.submitted) for o in outs],
            "max_output_tokens_per_s": float(max(per_second.values(), default=0)),
            "max_concurrent_requests": peak,
            "rtfx": 0.0,
        }
    )
    series = {
        "ttft": [o.ttft for o in ok],
        "tpot": [(o.latency - o.ttft) / (o.output_tokens - 1) for o in ok if o.output_tokens > 1],
        "itl": [gap for o in ok for gap in o.itl],
        "e2el": [o.latency for o in ok],
    }
    for name in selected:
        if name in series:
            result.update(_stats(name, series[name], percentiles))
    return result


def print_summary(args: argparse.Namespace, r: dict[str, Any]) -> None:
    """The console block vLLM prints (labels as in vLLM, for people reading the log)."""
    lines = [
        "{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="),
        f"{'Successful requests:':<40}{r['completed']:<10}",
        f"{'Failed requests:':<40}{r['failed']:<10}",
    ]
    if args.max_concurrency is not None:
        lines.append(f"{'Maximum request concurrency:':<40}{args.max_concurrency:<10}")
    lines += [
        f"{'Benchmark duration (s):':<40}{r['duration']:<10.2f}",
        f"{'Total input tokens:':<40}{r['total_input_tokens']:<10}",
        f"{'Total generated tokens:':<40}{r['total_output_tokens']:<10}",
        f"{'Request throughput (req/s):':<40}{r['request_throughput']:<10.2f}",
        f"{'Output token throughput (tok/s):':<40}{r['output_throughput']:<10.2f}",
        f"{'Peak output token throughput (tok/s):':<40}{r['max_output_tokens_per_s']:<10.2f}",
        f"{'Peak concurrent requests:':<40}{r['max_concurrent_requests']:<10.2f}",
        f"{'Total token throughput (tok/s):':<40}{r['total_token_throughput']:<10.2f}",
    ]
    titles = {
        "ttft": ("Time to First Token", "TTFT"),
        "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
        "itl": ("Inter-token Latency", "ITL"),
        "e2el": ("End-to-end Latency", "E2EL"),
    }
    for name, (title, short) in titles.items():
        if f"mean_{name}_ms" not in r:
            continue
        lines.append("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        for key, value in r.items():
            if key.endswith(f"_{name}_ms") and not key.startswith("std_"):
                stat = key.split("_", 1)[0]
                label = stat.capitalize() if stat in ("mean", "median") else stat.upper()
                lines.append(f"{f'{label} {short} (ms):':<40}{value:<10.2f}")
    lines.append("=" * 50)
    print("\n".join(lines), flush=True)


def _wait_ready(target: Target, timeout: int) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if target.get("/health", timeout=2.0)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(1.0)
    raise SystemExit(f"server at {target.host}:{target.port} not ready after {timeout} s")


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dataset_name != "random":
        parser.error(f"the fake vllm supports only --dataset-name random, not {args.dataset_name}")
    if args.backend not in COMPLETION_BACKENDS:
        parser.error(f"the fake vllm supports only completion backends, not {args.backend}")
    target = Target(args)
    if args.ready_check_timeout_sec > 0:
        _wait_ready(target, args.ready_check_timeout_sec)
    model = args.model
    if model is None:
        status, body = target.get("/v1/models")
        if status != 200:
            print(f"ERROR: cannot list models: HTTP {status}", file=sys.stderr)
            return 1
        model = json.loads(body)["data"][0]["id"]
    served = args.served_model_name or model
    rng = random.Random(args.seed)
    requests = make_requests(args, args.num_prompts, rng)
    if args.num_warmups > 0:
        print(f"Warming up with {args.num_warmups} requests...", flush=True)
        run_requests(target, make_requests(args, args.num_warmups, rng), args, served, rng)
    print(f"Traffic request rate: {args.request_rate}", flush=True)
    print(f"Maximum request concurrency: {args.max_concurrency}", flush=True)
    date = datetime.now().strftime("%Y%m%d-%H%M%S")
    bench_start = time.perf_counter()
    outs = run_requests(target, requests, args, served, rng)
    duration = time.perf_counter() - bench_start
    metrics = compute(args, outs, duration, bench_start)
    print_summary(args, metrics)
    for out in outs:
        if out.error:
            print(f"request failed: {out.error}", flush=True)
            break
    result: dict[str, Any] = {
        "date": date,
        "endpoint_type": args.backend,
        "backend": args.backend,
        "label": args.label,
        "model_id": model,
        "tokenizer_id": args.tokenizer or model,
        "num_prompts": args.num_prompts,
    }
    for item in args.metadata or []:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"invalid --metadata {item!r}: expected KEY=VALUE")
        result[key.strip()] = value.strip()
    result.update(
        {
            "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
            "burstiness": args.burstiness,
            "max_concurrency": args.max_concurrency,
        }
    )
    result.update(metrics)
    if args.save_result or args.append_result:
        rate = "inf" if not math.isfinite(args.request_rate) else args.request_rate
        concurrency = f"-concurrency{args.max_concurrency}" if args.max_concurrency else ""
        name = args.result_filename or (
            f"{args.label or args.backend}-{rate}qps{concurrency}-{model.split('/')[-1]}-{date}"
            ".json"
        )
        path = Path(args.result_dir or ".") / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if args.append_result and path.exists():
            with open(path, "a") as fh:
                fh.write("\n" + json.dumps(result))
        else:
            with open(path, "w") as fh:
                json.dump(result, fh, indent=1)
    if metrics["completed"] == 0:
        # vLLM 0.32 warns and still exits 0 with the result saved (completed 0, failed N).
        print(
            "UserWarning: All requests failed. This is likely due to a misconfiguration "
            "on the benchmark arguments.",
            file=sys.stderr,
            flush=True,
        )
    return 0
