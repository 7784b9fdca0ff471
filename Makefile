# The two set-up commands: `make demo` and `make test`. Each installs what it needs into .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test install clean gpu-check

install:
	@bash scripts/bootstrap.sh

demo: install
	$(VENV)/bin/hcml demo

test: install
	@bash scripts/ensure_prometheus.sh
	$(PY) -m pytest -q -ra --durations=15 $(PYTEST_ARGS)

gpu-check: install
	bash launch/device_check.sh run

clean:
	rm -rf runs/demo .pytest_cache build *.egg-info
