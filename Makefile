# precopy: make demo | make test | make bench | make bench-full | make soak | make criu
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: venv demo test test-fast bench bench-full soak lint clean criu

$(STAMP): pyproject.toml setup.py
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "precopy needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m precopy_agents.demo

# Two workers (pytest-xdist), each running whole test files (--dist loadfile: a file's module
# fixtures and its order stay as written); TEST_JOBS=0 runs in one process, as before.
TEST_JOBS ?= 2
TEST_ARGS = -q -p no:cacheprovider $(if $(filter 0,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist loadfile)

test: $(STAMP)
	$(BIN)/python -m pytest $(TEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest $(TEST_ARGS) -m "not slow"

# CRIU >= 4.2 for precopy-source --criu (root): the system's if new enough, else Debian's package
# unpacked into a private root, /var/lib/precopy/criu (python -m precopy.lab.criu_root --help).
criu: $(STAMP)
	$(BIN)/python -m precopy.lab.criu_root install

lint: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check mypy ruff
	$(BIN)/ruff check --select F,E9 precopy agents tests benchmarks
	$(BIN)/mypy --strict --ignore-missing-imports precopy agents

# The quick matrix (a few minutes) and everything (long; needs ~13 GiB of /dev/shm for 4 GiB).
# Both rewrite their section of benchmarks/RESULTS.md and the plots in benchmarks/results/.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.harness --matrix quick --update-results

bench-full: $(STAMP)
	$(BIN)/python -m benchmarks.harness --matrix full --update-results

# 200 migrations back and forth between two daemons in two network namespaces, a third
# with a fault (root; ~20-30 min); rewrites the soak section of benchmarks/RESULTS.md.
SOAK_MIGRATIONS ?= 200
SOAK_SEED ?= 1
soak: $(STAMP)
	$(BIN)/python -m benchmarks.soak --migrations $(SOAK_MIGRATIONS) --seed $(SOAK_SEED) --in-doubt-drill \
	    --json benchmarks/results/soak.json --update-results

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
