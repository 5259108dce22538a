# The OpenAI-compatible gateway (FastAPI + tritonclient gRPC). No torch: only the base dependencies.
#   docker build -f docker/gateway.Dockerfile -t gemma3-gateway .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080

WORKDIR /app
# Dependencies first (cached layer), then the code.
COPY pyproject.toml ./
RUN python - <<'PY' > /tmp/requirements.txt
import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))
PY
RUN pip install -r /tmp/requirements.txt

COPY gemma3_core ./gemma3_core
COPY gateway ./gateway
COPY triton_io ./triton_io
COPY build_engine ./build_engine
RUN pip install --no-deps .

RUN useradd --system --uid 10001 gateway
USER gateway
EXPOSE 8080
CMD ["python", "-m", "gateway"]
