# Two commands do all the set-up: `make run` and `make test`. Each installs what it needs
# (system packages, virtualenv, front-end assets, the sandbox image) and is quick the
# second time. `python -m berth --help` lists the commands behind the targets; BENCH_ARGS
# passes options to a benchmark (e.g. `make bench-vm BENCH_ARGS="--runs 5"`).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
SYSTEM_PACKAGES := docker.io iptables debootstrap chromium npm docker-compose nginx
# libvirt VMs: the daemons, QEMU, libvirt-python's build needs, the guest kernel (its vmlinuz and
# modules are copied into images, never booted on the host), busybox for the guest's init.
VM_PACKAGES := libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-dev qemu-system-x86 \
  qemu-utils pkg-config gcc linux-image-cloud-amd64 busybox-static e2fsprogs iproute2
STAMPS := .berth/stamps

.PHONY: run test test-fast test-chaos lint check setup sandbox-image vm-image image lock clean bench-spine \
  bench-llm bench-vm bench-fork bench-load eval-agent

run: setup
	$(PY) -m berth run

test: setup image lint
	$(PY) -m pytest -ra $(PYTEST_ARGS)

# The fast loop: no Docker, VMs or browser (markers in pyproject.toml), nothing to build; its
# tests mostly wait on loopback servers, so four workers share two cores well (a file's tests
# stay together: some share a module's server).
FAST := not docker and not libvirt and not chromium and not e2e and not chaos
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "$(FAST)" -n 4 --dist loadfile $(PYTEST_ARGS)

# The chaos suite alone (part of `make test` too): faults caused to systems of its own, each
# test saying what it did and found (-s shows those `chaos:` lines).
test-chaos: setup
	$(PY) -m pytest -ra -s -m chaos tests/e2e/chaos $(PYTEST_ARGS)

bench-spine: setup
	$(PY) -m berth bench spine $(BENCH_ARGS)

bench-llm: $(VENV)/.installed
	$(PY) -m berth bench llm $(BENCH_ARGS)

bench-vm: setup
	$(PY) -m berth bench vm $(BENCH_ARGS)

bench-fork: setup
	$(PY) -m berth bench fork $(BENCH_ARGS)

# The local fleet (2 hosts, 2 API replicas behind nginx, PostgreSQL, Docker) under load.
bench-load: setup
	$(PY) -m berth bench load $(BENCH_ARGS)

# The agent's task suite against the configured LLM providers (real calls: they cost money);
# EVAL_ARGS passes options (e.g. `make eval-agent EVAL_ARGS="--task csv-totals"`).
eval-agent: setup
	$(PY) -m berth eval agent $(EVAL_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .

setup: $(STAMPS)/system $(STAMPS)/system-vm $(VENV)/.installed ui/static/vendor/.installed \
  sandbox-image vm-image

# Installs those of the Debian packages $(1) that are missing (apt flags $(2)); waits for an
# apt run of another checkout to finish first.
define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  command -v npm >/dev/null && missing=$$(echo $$missing | sed 's/\bnpm\b//'); \
	  $(SUDO) apt-get -o DPkg::Lock::Timeout=900 update -q && DEBIAN_FRONTEND=noninteractive \
	    $(SUDO) apt-get -o DPkg::Lock::Timeout=900 install -y -q $(2) $$missing; \
	fi
	@mkdir -p $(STAMPS) && touch $@
endef

# Again when this file changes (a package added): only what is missing gets installed.
$(STAMPS)/system: Makefile
	@echo "== system packages: $(SYSTEM_PACKAGES)"
	$(call apt_install,$(SYSTEM_PACKAGES))

$(STAMPS)/system-vm:
	@echo "== virtual machine packages: $(VM_PACKAGES)"
	$(call apt_install,$(VM_PACKAGES),--no-install-recommends)

# libvirt-python compiles against libvirt-dev. The client (client/: berth_client, the `berth`
# command, the MCP server) is its own distribution; the API's /mcp imports it.
$(VENV)/.installed: pyproject.toml client/pyproject.toml constraints.txt $(STAMPS)/system-vm
	@echo "== Python virtualenv (pinned by constraints.txt)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]' -e ./client
	@touch $@

ui/static/vendor/.installed: ui/package.json ui/package-lock.json
	@echo "== front-end assets (htmx, htmx SSE extension, xterm.js)"
	cd ui && npm ci --no-audit --no-fund --silent
	mkdir -p ui/static/vendor
	cp ui/node_modules/htmx.org/dist/htmx.min.js ui/node_modules/htmx-ext-sse/sse.js ui/static/vendor/
	cp ui/node_modules/@xterm/xterm/lib/xterm.js ui/node_modules/@xterm/xterm/css/xterm.css \
	  ui/node_modules/@xterm/addon-fit/lib/addon-fit.js ui/static/vendor/
	@touch $@

sandbox-image: $(VENV)/.installed $(STAMPS)/system
	@echo "== sandbox engine and image"
	$(PY) -m berth prepare --provider docker

vm-image: $(VENV)/.installed $(STAMPS)/system-vm
	@echo "== libvirt host and VM template image"
	$(PY) -m berth prepare --provider libvirt

# Berth's own image, berth:<version> (and berth-postgres:<version>, the compose stack's
# database), from the sandboxes' debootstrap root (deploy/image/Dockerfile). The wheels are
# fetched again only when the pins change, and the build context holds only what the image
# takes, so an unchanged tree rebuilds from Docker's cache in seconds.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE_DIR := .berth/build/image
image: sandbox-image $(IMAGE_DIR)/wheels/.fetched ui/static/vendor/.installed
	@echo "== image berth:$(VERSION)"
	rm -rf $(IMAGE_DIR)/context && mkdir -p $(IMAGE_DIR)/context/src
	mkdir -p $(IMAGE_DIR)/context/wheels && cp -l $(IMAGE_DIR)/wheels/*.whl $(IMAGE_DIR)/context/wheels
	{ git ls-files -z --cached --others --exclude-standard; printf 'ui/static/vendor\0'; } | \
	  tar -c --null --ignore-failed-read -T - | tar -x -C $(IMAGE_DIR)/context/src
	base=$$($(PY) -c 'import vm_templates as t; print("berth-base-default:" + t.fingerprint(t.path("default") / "packages"))'); \
	for target in berth postgres; do \
	  name=$$([ $$target = berth ] && echo berth || echo berth-$$target); \
	  DOCKER_BUILDKIT=0 docker build -q --build-arg BASE=$$base --target $$target \
	    -f deploy/image/Dockerfile -t $$name:$(VERSION) -t $$name:latest $(IMAGE_DIR)/context || exit 1; \
	done

# Every dependency of the backend and the client as a wheel (libvirt-python's built here,
# against the host's libvirt-dev); the two projects themselves go in as source.
$(IMAGE_DIR)/wheels/.fetched: pyproject.toml client/pyproject.toml constraints.txt $(VENV)/.installed
	rm -rf $(IMAGE_DIR)/wheels && mkdir -p $(IMAGE_DIR)/wheels
	$(PY) -c 'import tomllib; [print(d) for f in ("pyproject.toml", "client/pyproject.toml") \
	  for d in tomllib.load(open(f, "rb"))["project"]["dependencies"]]' > $(IMAGE_DIR)/requirements.txt
	$(PY) -m pip wheel -q -c constraints.txt -w $(IMAGE_DIR)/wheels -r $(IMAGE_DIR)/requirements.txt
	@touch $@

lock:
	$(PY) -m pip freeze --exclude-editable > constraints.txt

clean:
	rm -rf $(VENV) ui/node_modules ui/static/vendor .mypy_cache .ruff_cache .pytest_cache
