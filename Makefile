# Two commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
RUNTIME := $(VENV)/.runtime-stamp

.PHONY: demo test lint unit integration bench clean image lock

# The runtime dependencies come from requirements.lock, hash-checked, exactly as the image
# installs them: that is all `make demo` needs. The test tools come with `make test`, resolved
# around them (pip refuses hashes in a constraints file next to an editable install, so the
# constraints are the lock without its hashes).
$(RUNTIME): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --require-hashes --only-binary :all: -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	sed -e '/^ *--hash=/d' -e 's/ *\\$$//' requirements.lock > $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(RUNTIME)
	$(BIN)/mtls-sidecar demo

lint: $(STAMP)
	$(BIN)/ruff check proxy tests bench
	$(BIN)/ruff format --check proxy tests bench
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q -m "not integration"

integration: $(STAMP)
	$(BIN)/pytest -q -m integration -n 2

test: lint $(STAMP)
	$(BIN)/pytest -q -n 2

bench: $(STAMP)
	bench/run-sidecar.sh

# Refresh the lock to the newest releases pyproject.toml allows, with every artifact's hash.
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q pip-tools
	$(BIN)/pip-compile -q --upgrade --generate-hashes --allow-unsafe --strip-extras \
	  --no-emit-index-url --no-emit-find-links --output-file requirements.lock pyproject.toml

# The image, built from a wheelhouse made here: the locked dependencies (hash-checked, wheels
# only, for this CPython 3.11 on x86_64) and the project's own wheel, its timestamps taken from
# the last commit so that an unchanged tree gives the same wheel and podman reuses its layers.
# BASE must hold the same CPython minor version; PODMAN is the container command with its flags.
BASE ?= docker.io/library/python:3.11-slim
PODMAN ?= podman
IMAGE ?= localhost/mtls-sidecar:latest
WHEELHOUSE := build/wheelhouse

build/wheelhouse-deps.stamp: requirements.lock
	rm -rf $(WHEELHOUSE)/deps
	$(BIN)/pip wheel -q --require-hashes --only-binary :all: --no-deps -r requirements.lock \
	  -w $(WHEELHOUSE)/deps
	touch $@

image: $(STAMP) build/wheelhouse-deps.stamp
	rm -rf $(WHEELHOUSE)/app build/lib build/bdist.*  # stale modules in build/lib would enter the wheel
	SOURCE_DATE_EPOCH=$$(git log -1 --format=%ct 2>/dev/null || echo 315532800) \
	  $(BIN)/pip wheel -q --no-deps -w $(WHEELHOUSE)/app .
	$(PODMAN) build --network=none --build-arg BASE=$(BASE) -t $(IMAGE) -f Containerfile .
	# what this build superseded: the app stage it made, and the image the tag left; the deps
	# stage stays, as the cache of the next build
	$(PODMAN) image prune -f --filter label=io.mtls-sidecar.stage=app >/dev/null
	$(PODMAN) image prune -f --filter label=io.mtls-sidecar.stage=image >/dev/null

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
