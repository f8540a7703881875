# The two commands of the README: `make demo` and `make test`. Everything else is what they need.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP) vcsim

$(STAMP): pyproject.toml scripts/install-system-deps.sh
	./scripts/install-system-deps.sh
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

# vcsim (govmomi's vCenter simulator) for the vSphere tests: built offline from Debian's Go sources into
# ~/.cache/hotvm/vcsim (never committed); a no-op when already built.
.PHONY: vcsim
vcsim:
	./scripts/build-vcsim.sh

demo: setup
	$(VENV)/bin/python -m hotvm.demo

test: setup
	$(VENV)/bin/pytest -q

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(VENV)/bin/python bench/export.py
	$(VENV)/bin/python bench/pivot_stall.py
	$(VENV)/bin/python bench/prefect_overhead.py

clean:
	rm -rf .hotvm demo-out

# A real Prefect deployment on this machine: PostgreSQL + `prefect server start` + work pool + deployments
# (docs/scale-out.md). `make worker HOST=hv1` starts that host's worker here; `make server-stop` stops all.
.PHONY: server worker server-stop
server: setup
	./scripts/prefect-server.sh start

worker: setup
	@test -n "$(HOST)" || { echo "usage: make worker HOST=<hypervisor host of hotvm.yaml>" >&2; exit 2; }
	./scripts/prefect-server.sh worker $(HOST)

server-stop:
	./scripts/prefect-server.sh stop
