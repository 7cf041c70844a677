# The first two targets are the README's quick start: each sets up everything it needs on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test image-test serve bench bench-quick bench-servers soak clean

demo: $(VENV)/.installed
	$(BIN)/sagemaker-metrics-proxy demo $(ARGS)

# The example model on :8081 and the proxy in front of it on :8080 (metrics on :9090), until Ctrl-C.
serve: $(VENV)/.installed
	$(BIN)/python -m example_model --port 8081 & model=$$!; trap 'kill $$model' EXIT INT TERM; \
	$(BIN)/sagemaker-metrics-proxy serve --upstream http://127.0.0.1:8081 --endpoint-name my-endpoint $(ARGS)

test: $(VENV)/.installed
	$(BIN)/ruff check proxy metrics example_model tests benchmarks
	$(BIN)/mypy
	$(BIN)/pytest -q

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

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
