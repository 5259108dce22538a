"""perf_analyzer invocations (Triton gRPC streaming and OpenAI SSE) and TTFT/ITL/tokens from its exports.

perf_analyzer prints per-request latency only; its `--profile-export-file` keeps, for every request, the
send timestamp and one timestamp (plus the outputs) per streamed response, from which we derive:

- TTFT: first response carrying output after the send (for SSE: the first chunk with content, not the role
  chunk);
- ITL: per request, (last token time - first token time) / (tokens - 1), so paths that merge tokens into one
  event (a character split over byte-fallback tokens is one SSE chunk) are compared fairly;
- output tokens/s: all tokens of the run / (last response - first send).

Token counts come from the servers themselves: `num_output_tokens` per ensemble response, the `usage` chunk
(`stream_options.include_usage`) for the gateway.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The prompts of every benchmark here (CPU `make bench` and benchmarks/gpu_bench.sh): short, so the cost
# under study is per output token, and open-ended, so the model talks until max_tokens.
MESSAGES = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a bicycle gear system works, step by step.",
    "Describe a busy city market in the morning, with many details.",
    "Write a detailed guide to planting a vegetable garden for beginners.",
]


@dataclass
class RunStats:
    requests: int
    tokens: int
    wall_s: float
    ttft_ms: list[float] = field(default_factory=list)
    itl_ms: list[float] = field(default_factory=list)
    errors: int = 0
    first_sent_ns: int | None = None  # the run's span, for wall_s
    last_output_ns: int | None = None

    def add(self, sent_ns: int, output_ns: Sequence[int], tokens: int) -> None:
        """One request: when it was sent, when its responses with output arrived, tokens delivered."""
        if not output_ns:
            self.errors += 1
            return
        self.tokens += tokens
        self.ttft_ms.append((output_ns[0] - sent_ns) / 1e6)
        if tokens > 1:
            self.itl_ms.append((output_ns[-1] - output_ns[0]) / 1e6 / (tokens - 1))
        self.first_sent_ns = min(sent_ns, self.first_sent_ns or sent_ns)
        self.last_output_ns = max(output_ns[-1], self.last_output_ns or 0)
        self.wall_s = (self.last_output_ns - self.first_sent_ns) / 1e9

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "tokens": self.tokens,
            "wall_s": round(self.wall_s, 4),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "ttft_p50_ms": _pct(self.ttft_ms, 50),
            "ttft_p95_ms": _pct(self.ttft_ms, 95),
            "itl_p50_ms": _pct(self.itl_ms, 50),
            "itl_p95_ms": _pct(self.itl_ms, 95),
            "errors": self.errors,
        }


def _pct(values: Sequence[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 3)
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 3)


# --- input data ---------------------------------------------------------------------------------------


def ensemble_input_data(prompts: Sequence[str], max_tokens: int, min_tokens: int = 0) -> dict[str, Any]:
    """`text_input` is the rendered prompt; greedy exactly as the gateway sends it (top_k 1, top_p 1, T 1)."""
    extra = {"min_tokens": [min_tokens]} if min_tokens else {}
    return {
        "data": [
            {
                **extra,
                "text_input": [p],
                "max_tokens": [max_tokens],
                "stream": [True],
                "exclude_input_in_output": [True],
                "return_num_output_tokens": [True],
                "return_num_input_tokens": [True],
                "top_k": [1],
                "top_p": [1.0],
                "temperature": [1.0],
            }
            for p in prompts
        ]
    }


def openai_input_data(
    messages: Sequence[str], model: str, max_tokens: int, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Streamed greedy chat requests; `extra`: more request fields (`logprobs`, ...)."""
    return {
        "data": [
            {
                "payload": [
                    {
                        "model": model,
                        "messages": [{"role": "user", "content": m}],
                        "max_tokens": max_tokens,
                        "temperature": 0,
                        "stream": True,
                        "stream_options": {"include_usage": True},
                        **(extra or {}),
                    }
                ]
            }
            for m in messages
        ]
    }


def engine_input_data(prompt_ids: Sequence[Sequence[int]], max_tokens: int) -> dict[str, Any]:
    """Straight to `tensorrt_llm` (calibration: the double's path without the ensemble)."""
    return {
        "data": [
            {
                "input_ids": {"content": list(ids), "shape": [len(ids)]},
                "input_lengths": [len(ids)],
                "request_output_len": [max_tokens],
                "streaming": [True],
                "end_id": [1],
            }
            for ids in prompt_ids
        ]
    }


# --- running perf_analyzer ----------------------------------------------------------------------------


@dataclass
class PerfAnalyzer:
    binary: Path
    env: dict[str, str]

    def version(self) -> str:
        out = subprocess.run([str(self.binary), "--version"], capture_output=True, text=True, env=self.env)
        return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"

    def run(
        self,
        *,
        kind: str,
        url: str,
        model: str,
        input_data: dict[str, Any],
        concurrency: int,
        requests: int,
        workdir: Path,
        name: str,
    ) -> tuple[dict[str, Any], float]:
        """One load point; returns (the parsed export, perf_analyzer's own CPU seconds)."""
        workdir.mkdir(parents=True, exist_ok=True)
        data_file = workdir / f"{name}.input.json"
        export = workdir / f"{name}.export.json"
        data_file.write_text(json.dumps(input_data))
        export.unlink(missing_ok=True)
        common = [
            "--async",
            f"--input-data={data_file}",
            f"--concurrency-range={concurrency}",
            f"--request-count={requests}",
            f"--profile-export-file={export}",
            "--stability-percentage=999",
            "--max-trials=1",
            "--measurement-interval=600000",
        ]
        if kind == "triton":
            cmd = [str(self.binary), "-m", model, "-i", "grpc", "-u", url, "--streaming", *common]
        else:
            cmd = [
                str(self.binary),
                "-m",
                model,
                "--service-kind=openai",
                "--endpoint=v1/chat/completions",
                "-u",
                url,
                *common,
            ]
        # perf_analyzer has been seen to exit 0 with its export cut short (at a buffer boundary): such a
        # point is measured once more, never half-parsed.
        for attempt in (1, 2):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=900)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            (workdir / f"{name}.log").write_text(" ".join(cmd) + "\n\n" + proc.stdout + proc.stderr)
            if proc.returncode != 0 or not export.exists():
                tail = proc.stdout[-3000:] + proc.stderr[-3000:]
                raise RuntimeError(f"perf_analyzer {name} failed ({proc.returncode}):\n{tail}")
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            try:
                return load_export(export), cpu
            except json.JSONDecodeError as exc:
                if attempt == 2:
                    raise
                print(f"perf_analyzer {name}: export unreadable ({exc}); measuring again", file=sys.stderr)
                export.unlink(missing_ok=True)
        raise AssertionError("unreachable")


def _requests(export: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for exp in export.get("experiments", []) for r in exp.get("requests", [])]


def _ensemble_tokens(output: dict[str, Any]) -> tuple[int, bool]:
    """(tokens in this response, whether it carried any) from one perf_analyzer response output."""
    count = output.get("num_output_tokens")
    if isinstance(count, dict):  # {"content": [..], "shape": [..]} in some exports
        count = count.get("content")
    while isinstance(count, list):
        count = count[0] if count else 0
    if count is None:
        text = output.get("text_output")
        return (1, True) if text else (0, False)
    return int(count), int(count) > 0


def parse_triton(export: dict[str, Any]) -> RunStats:
    reqs = _requests(export)
    stats = RunStats(requests=len(reqs), tokens=0, wall_s=0.0)
    for r in reqs:
        times: list[int] = []
        n = 0
        for ts, out in zip(r.get("response_timestamps", []), r.get("response_outputs", []), strict=False):
            k, has = _ensemble_tokens(out or {})
            if has:
                times.append(ts)
                n += k
        stats.add(r["timestamp"], times, n)
    return stats


def _sse_events(output: Any) -> list[dict[str, Any]]:
    """The JSON chunks in one recorded SSE response (perf_analyzer may record several events at once)."""
    text = output.get("response") if isinstance(output, dict) else output
    if not isinstance(text, str):
        return []
    events = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("data:"):
            continue
        body = line[5:].strip()
        if body and body != "[DONE]":
            try:
                events.append(json.loads(body))
            except ValueError:
                continue
    return events


def parse_openai(export: dict[str, Any]) -> RunStats:
    reqs = _requests(export)
    stats = RunStats(requests=len(reqs), tokens=0, wall_s=0.0)
    for r in reqs:
        content_times: list[int] = []
        tokens = 0
        for ts, out in zip(r.get("response_timestamps", []), r.get("response_outputs", []), strict=False):
            for ev in _sse_events(out):
                if "error" in ev:
                    stats.errors += 1
                usage = ev.get("usage")
                if usage:
                    tokens = int(usage.get("completion_tokens", 0))
                if any((c.get("delta") or {}).get("content") for c in ev.get("choices") or []):
                    content_times.append(ts)
        stats.add(r["timestamp"], content_times, tokens)
    return stats


def wait_idle(seconds: float = 0.5) -> None:
    """Let in-flight work and stream teardown finish before the next CPU snapshot."""
    time.sleep(seconds)


def perf_analyzer_env(cuda_lib_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(cuda_lib_dir), env.get("LD_LIBRARY_PATH")) if p)
    return env


def load_export(path: Path) -> dict[str, Any]:
    # Streamed text_output may end mid-character (byte-fallback tokens): not valid UTF-8 on its own.
    return json.loads(path.read_bytes().decode("utf-8", "replace"))


def main(argv: list[str] | None = None) -> int:
    """CLI for benchmarks/gpu_bench.sh (stdlib only, so it runs in NVIDIA's SDK image as it is)."""
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.loads")
    sub = parser.add_subparsers(dest="cmd", required=True)
    inputs = sub.add_parser("inputs", help="write ensemble.json and openai.json (the benchmark prompts)")
    inputs.add_argument("out_dir", type=Path)
    inputs.add_argument("--model", required=True, help="model id the gateway serves")
    inputs.add_argument("--max-tokens", type=int, default=256)
    summarize = sub.add_parser("summarize", help="TTFT/ITL/tokens per perf_analyzer export")
    summarize.add_argument("exports", nargs="+", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "inputs":
        from gemma3_core.chat_template import render_chat

        prompts = [render_chat([{"role": "user", "content": m}]) for m in MESSAGES]
        args.out_dir.mkdir(parents=True, exist_ok=True)
        data = ensemble_input_data(prompts, args.max_tokens, min_tokens=args.max_tokens)
        (args.out_dir / "ensemble.json").write_text(json.dumps(data))
        (args.out_dir / "openai.json").write_text(
            json.dumps(openai_input_data(MESSAGES, args.model, args.max_tokens))
        )
        return 0
    print("| export | requests | tokens | tok/s | TTFT p50/p95 ms | ITL p50/p95 ms |")
    print("|---|---|---|---|---|---|")
    for path in args.exports:
        export = load_export(path)
        is_openai = "openai" in path.name
        s = (parse_openai(export) if is_openai else parse_triton(export)).summary()
        print(
            f"| {path.name} | {s['requests']} | {s['tokens']} | {s['tokens_per_s']} | {s['ttft_p50_ms']}/"
            f"{s['ttft_p95_ms']} | {s['itl_p50_ms']}/{s['itl_p95_ms']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
