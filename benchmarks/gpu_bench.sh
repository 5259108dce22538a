#!/usr/bin/env bash
# The CPU `make bench` loads against the GPU deployment, from NVIDIA's Triton SDK image (perf_analyzer and
# genai-perf on PATH). Compose profile `bench`:
#
#   docker compose --profile bench run --rm bench bash benchmarks/gpu_bench.sh
#
# Same prompts (benchmarks/loads.py MESSAGES), same perf_analyzer flags as benchmarks/run_all.py:
#   1. perf_analyzer -> Triton `ensemble`, gRPC streaming, per-response timestamps (TTFT, ITL, tokens/s);
#   2. perf_analyzer -> the gateway, OpenAI chat completions with "stream": true;
#   3. genai-perf (when the image has it) -> the ensemble, for NVIDIA's own TTFT/ITL report.
# Expected on one H100 SXM (docs/benchmarks.md): single-stream decode bound ≈ 209 tok/s for the int4 27B;
# published stacks reach 53-58 % of such bounds, so ≈ 110-121 tok/s (ITL ≈ 8-9 ms) at concurrency 1.
set -euo pipefail

cd "$(dirname "$0")/.."
TRITON_GRPC_URL=${TRITON_GRPC_URL:-triton:8001}
GATEWAY_URL=${GATEWAY_URL:-http://gateway:8080}
MAX_TOKENS=${MAX_TOKENS:-256}
CONCURRENCIES=${CONCURRENCIES:-"1 8 32"}
REQUESTS_PER_STREAM=${REQUESTS_PER_STREAM:-4}
OUT=${OUT:-build/bench-gpu/$(date +%Y%m%d-%H%M%S)}
AUTH=()     # curl
PA_AUTH=()  # perf_analyzer: -H 'Header:Value'
if [[ -n "${GATEWAY_API_KEY:-}" ]]; then
  AUTH=(-H "Authorization: Bearer ${GATEWAY_API_KEY}")
  PA_AUTH=(-H "Authorization:Bearer ${GATEWAY_API_KEY}")
fi
mkdir -p "$OUT"

if [[ -z "${MODEL_ID:-}" ]]; then
  MODEL_ID=$(curl -sf "${AUTH[@]}" "${GATEWAY_URL}/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
fi
# Where the builder downloaded MODEL_ID (BuildSettings.checkpoint_dir: org/name -> org--name).
TOKENIZER_DIR=${TOKENIZER_DIR:-/engines/hf/${MODEL_ID//\//--}}
echo "triton ${TRITON_GRPC_URL}, gateway ${GATEWAY_URL} (model ${MODEL_ID}), max_tokens ${MAX_TOKENS}, out ${OUT}"
python3 -m benchmarks.loads inputs "$OUT" --model "$MODEL_ID" --max-tokens "$MAX_TOKENS"
perf_analyzer --version 2>/dev/null | head -1 | tee "$OUT/versions.txt" || true

common() {  # concurrency, export file
  echo --async --concurrency-range="$1" --request-count=$(( $1 * REQUESTS_PER_STREAM )) \
       --profile-export-file="$2" --stability-percentage=999 --max-trials=1 --measurement-interval=600000
}

for c in $CONCURRENCIES; do
  echo "== ensemble, concurrency $c"
  # shellcheck disable=SC2046
  perf_analyzer -m ensemble -i grpc -u "$TRITON_GRPC_URL" --streaming --input-data "$OUT/ensemble.json" \
    $(common "$c" "$OUT/ensemble-c$c.export.json") > "$OUT/ensemble-c$c.log" 2>&1
  echo "== gateway, concurrency $c"
  # shellcheck disable=SC2046
  perf_analyzer -m "$MODEL_ID" --service-kind=openai --endpoint=v1/chat/completions \
    -u "${GATEWAY_URL#http://}" "${PA_AUTH[@]}" --input-data "$OUT/openai.json" \
    $(common "$c" "$OUT/openai-c$c.export.json") > "$OUT/openai-c$c.log" 2>&1
done

if command -v genai-perf >/dev/null && [[ -d "$TOKENIZER_DIR" ]]; then
  for c in $CONCURRENCIES; do
    echo "== genai-perf ensemble, concurrency $c"
    genai-perf profile -m ensemble --service-kind triton --backend tensorrtllm --streaming \
      -u "$TRITON_GRPC_URL" --tokenizer "$TOKENIZER_DIR" \
      --synthetic-input-tokens-mean 128 --synthetic-input-tokens-stddev 0 \
      --output-tokens-mean "$MAX_TOKENS" --output-tokens-mean-deterministic \
      --concurrency "$c" --request-count $(( c * REQUESTS_PER_STREAM )) \
      --artifact-dir "$OUT/genai-perf-c$c" > "$OUT/genai-perf-c$c.log" 2>&1 \
      || echo "   genai-perf failed (see $OUT/genai-perf-c$c.log); the perf_analyzer results stand"
  done
else
  echo "(genai-perf or the tokenizer at $TOKENIZER_DIR not found: skipped)"
fi

python3 -m benchmarks.loads summarize "$OUT"/*.export.json | tee "$OUT/summary.md"
