# Two commands do all the set-up: `make run` and `make test`. Each installs what it needs
# (system packages, virtualenv, front-end assets, the sandbox image) and is quick the
# second time.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
SYSTEM_PACKAGES := docker.io iptables debootstrap chromium npm docker-compose
STAMPS := .berth/stamps

.PHONY: run test lint check setup sandbox-image lock clean bench-spine bench-llm

run: setup
	$(PY) -m berth run

test: setup lint
	$(PY) -m pytest -ra $(PYTEST_ARGS)

bench-spine: setup
	$(PY) -m bench.spine

bench-llm: $(VENV)/.installed
	$(PY) -m bench.llm

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .

setup: $(STAMPS)/system $(VENV)/.installed ui/static/vendor/.installed sandbox-image

# Again when this file changes (a package added): only what is missing gets installed.
$(STAMPS)/system: Makefile
	@echo "== system packages: $(SYSTEM_PACKAGES)"
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  command -v npm >/dev/null && missing=$$(echo $$missing | sed 's/\bnpm\b//'); \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; \
	fi
	@mkdir -p $(STAMPS) && touch $@

$(VENV)/.installed: pyproject.toml constraints.txt
	@echo "== Python virtualenv (pinned by constraints.txt)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $@

ui/static/vendor/.installed: ui/package.json ui/package-lock.json
	@echo "== front-end assets (htmx, htmx SSE extension)"
	cd ui && npm ci --no-audit --no-fund --silent
	mkdir -p ui/static/vendor
	cp ui/node_modules/htmx.org/dist/htmx.min.js ui/node_modules/htmx-ext-sse/sse.js ui/static/vendor/
	@touch $@

sandbox-image: $(VENV)/.installed $(STAMPS)/system
	@echo "== sandbox engine and image"
	$(PY) -m sandboxes prepare

lock:
	$(PY) -m pip freeze --exclude-editable > constraints.txt

clean:
	rm -rf $(VENV) ui/node_modules ui/static/vendor .mypy_cache .ruff_cache .pytest_cache
