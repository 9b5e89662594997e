# Two commands for a newcomer: `make demo` and `make test`. Each installs what it
# needs into .venv first (idempotent; see scripts/setup_env.sh).
VENV    ?= .venv
PY      := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test demo bench clean

setup:
	@VENV=$(VENV) bash scripts/setup_env.sh

# pytest exits 5 when it collected nothing: that is a failure, not a pass.
test: setup
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; exit $$rc

demo: setup
	$(VENV)/bin/shrink demo -o demo-out

# benchmarks, plus the tests marked slow (e.g. training the full tiny-gpt)
bench: setup
	$(PY) bench/run_all.py
	$(PY) -m pytest -m slow

clean:
	rm -rf $(VENV) demo-out .pytest_cache .hypothesis
