# The first two targets are the README's quick start: each sets up everything it needs on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test compiled pure image-test serve bench bench-quick bench-servers soak clean

demo: $(VENV)/.installed
	$(BIN)/sagemaker-metrics-proxy demo $(ARGS)

# The example model on :8081 and the proxy in front of it on :8080 (metrics on :9090), until Ctrl-C.
serve: $(VENV)/.installed
	$(BIN)/python -m example_model --port 8081 & model=$$!; trap 'kill $$model' EXIT INT TERM; \
	$(BIN)/sagemaker-metrics-proxy serve --upstream http://127.0.0.1:8081 --endpoint-name my-endpoint $(ARGS)

# The tests run on both builds: pure Python, then compiled (where a C compiler and Python's headers are found;
# CI must have them), and the checkout is left pure, so that an edit to a .py file takes effect at once.
test: $(VENV)/.installed
	$(BIN)/ruff check proxy metrics example_model tests benchmarks
	$(BIN)/mypy
	@$(MAKE) --no-print-directory pure
	SAGEMAKER_PROXY_EXPECT_BUILD=pure $(BIN)/pytest -q $(PYTEST_ARGS)
	@SAGEMAKER_PROXY_COMPILE=$(if $(filter true,$(CI)),1,auto) $(MAKE) --no-print-directory compiled
	@if $(BIN)/python -m proxy --version | grep -q 'compiled build'; then \
	    echo "SAGEMAKER_PROXY_EXPECT_BUILD=compiled $(BIN)/pytest -q $(PYTEST_ARGS)"; \
	    SAGEMAKER_PROXY_EXPECT_BUILD=compiled $(BIN)/pytest -q $(PYTEST_ARGS); status=$$?; \
	    $(MAKE) --no-print-directory pure; exit $$status; \
	else \
	    echo "make test: no compiled build here (it needs a C compiler and Python's headers): the pure-Python build alone was tested"; \
	    $(MAKE) --no-print-directory pure; \
	fi

# The request path compiled with mypyc (setup.py), in place: each module's extension beside its .py, which Python
# imports first (about a minute). `make pure` removes them; `sagemaker-metrics-proxy --version` says which runs.
compiled: $(VENV)/.installed
	SAGEMAKER_PROXY_COMPILE=$${SAGEMAKER_PROXY_COMPILE:-1} $(BIN)/pip install -q --no-build-isolation --no-deps -e .

pure:
	find proxy metrics -name '*.so' -delete

# The Dockerfile built with buildah and run with podman (runc), checked over loopback (about 25 s; a minute
# the first time, and the first apt-get install). Root: sudo make image-test. See deploy/image-test.sh.
image-test:
	bash deploy/image-test.sh

bench: $(VENV)/.bench
	$(BIN)/python -m benchmarks.run

bench-quick: $(VENV)/.bench
	$(BIN)/python -m benchmarks.run --quick

# The front door alone: a trivial ASGI app under the built-in server and under uvicorn (about 2 minutes).
bench-servers: $(VENV)/.bench
	$(BIN)/python -m benchmarks.servers

# One proxy process under wrk until 1,000,000 requests past warm-up (1-3 minutes on 2 cores); SOAK_ARGS="--requests 50000" for less.
soak: $(VENV)/.bench
	$(BIN)/python -m benchmarks.soak $(SOAK_ARGS)

$(VENV)/.bench: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $@

# Installed pure: `make compiled` builds the compiled modules in place.
$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	SAGEMAKER_PROXY_COMPILE=0 $(BIN)/pip install -q -e '.[test]'
	touch $@

clean: pure
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache build
