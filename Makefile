# Two set-up commands (README): `make serve` and `make test`. Everything else here is a helper.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# The Triton Python backend stub embeds the OS's libpython3.11: the virtualenv must be made from that
# interpreter (see stack/triton_launcher.py), not from pyenv/conda builds that may come first on PATH.
PYTHON_SYS ?= $(firstword $(wildcard /usr/bin/python3.11 /usr/local/bin/python3.11) $(shell command -v python3))
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell md5sum pyproject.toml | cut -c1-12)
PYTEST_ARGS ?=
# What `make lint` type-checks and scans for dead code (packages that do not exist are skipped, so the list can
# name a package before it lands); pyproject.toml says how strictly each is checked.
LINT_PACKAGES := $(wildcard gateway gemma3_core triton_io cpu_engine build_engine stack benchmarks)

.PHONY: help serve test test-e2e bench gpu-acceptance lint format system-deps clean

help:
	@echo "make serve   - install, prepare Gemma 3 270M, start Triton + gateway on CPU (Ctrl-C stops)"
	@echo "make test    - install and run the test suite"
	@echo "make test-e2e E2E_BASE_URL=http://host:8080 - run the end-to-end suite against a deployment"
	@echo "make bench   - benchmarks (writes docs/benchmarks.md)"
	@echo "make gpu-acceptance [ACCEPTANCE_ARGS=--dry-run] - GPU host: build, verify, serve, e2e, bench, report"
	@echo "make lint    - ruff (check + format), mypy, vulture (dead code)"

# Debian packages the stack needs; installed when missing and we are root (CI, containers). g++ builds the
# native engine test double (benchmarks and its tests; build_engine/fast_double.py). prometheus brings
# promtool, which runs the Kubernetes recording rules in tests/test_k8s_manifests.py; where systemd runs,
# the Prometheus server the package enables is stopped again (only the tool is wanted).
system-deps:
	@missing=""; \
	[ -e /usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0 ] || [ -e /usr/local/lib/libpython3.11.so.1.0 ] || missing="$$missing libpython3.11"; \
	$(PYTHON_SYS) -c "import ensurepip, venv" 2>/dev/null || missing="$$missing python3.11-venv"; \
	command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	command -v g++ >/dev/null || missing="$$missing g++"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) || echo "warning: apt-get failed for$$missing"; \
	    case "$$missing" in *prometheus*) [ -d /run/systemd/system ] && systemctl disable --now prometheus >/dev/null 2>&1 || true;; esac; \
	  else echo "warning: missing Debian packages:$$missing (apt-get install them)"; fi; \
	fi

$(STAMP): pyproject.toml
	@home=$$(sed -n 's/^home = //p' $(VENV)/pyvenv.cfg 2>/dev/null); \
	if [ -n "$$home" ] && [ "$$home" != "$$(dirname $(PYTHON_SYS))" ]; then \
	  echo "$(VENV) was made by $$home/python, not $(PYTHON_SYS): recreating"; rm -rf $(VENV); fi
	@[ -x $(PY) ] || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[cpu,build,dev]"
	@rm -f $(VENV)/.installed-*; touch $@

serve: system-deps $(STAMP)
	$(PY) -m stack.serve

test: system-deps $(STAMP)
	$(PY) -m pytest -q -m "not gpu" --timeout=900 --durations=15 $(PYTEST_ARGS)

test-e2e: $(STAMP)
	$(PY) -m pytest -q -m e2e --timeout=900 $(PYTEST_ARGS)

bench: system-deps $(STAMP)  ## ~8 min on 2 cores; perf_analyzer etc. go into .venv-bench, not the runtime venv
	@command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && ! ldconfig -p | grep -q libb64.so.0d && apt-get install -y -qq libb64-0d >/dev/null || true
	$(PY) -m benchmarks.run_all

# On a GPU host with Docker + the NVIDIA runtime: every check the CPU suite cannot make, one report
# (reports/gpu-acceptance-<date>.md). ACCEPTANCE_ARGS=--dry-run prints the steps (docs/gpu.md).
ACCEPTANCE_ARGS ?=
gpu-acceptance: $(STAMP)
	$(PY) -m build_engine.gpu.acceptance $(ACCEPTANCE_ARGS)

# Every check runs, so one report shows all findings; fails if any failed. system-deps: a fresh machine needs
# python3.11-venv before the virtualenv can be made.
lint: system-deps $(STAMP)
	@rc=0; \
	for check in "ruff check ." "ruff format --check ." "mypy $(LINT_PACKAGES)" \
	  "vulture $(LINT_PACKAGES) model_repository tests vulture_allowlist.py"; do \
	  echo "$(PY) -m $$check"; $(PY) -m $$check || rc=1; \
	done; exit $$rc

format: $(STAMP)
	$(PY) -m ruff format .

clean:
	rm -rf build .pytest_cache .ruff_cache .mypy_cache
