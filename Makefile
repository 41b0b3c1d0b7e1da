# The one place that knows how to set the project up. `make test` and `make demo` work from a clean
# clone: they create .venv, install the pinned dependencies and build the compiled modules.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
BUILT := $(VENV)/.built
# pytest-xdist workers: many tests leave a core idle (Triton's interpreter, process start-up); on the
# slowest 2-core CPU machine seen, two workers took the suite from 769 s to 664-736 s. pip installs skip
# byte-compiling (--no-compile): Python compiles what the tests import, a fraction of each package.
TEST_WORKERS ?= 2

.PHONY: setup build test lint format demo bench clean

setup: $(BUILT)

# --system-site-packages: on a machine that already has a CUDA torch (the GPU machine), use it.
$(DEPS): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --no-compile torch==2.13.0
	# The Triton interpreter (CPU-only torch) breaks with numpy >= 2.4.
	$(PY) -c "import sys, torch; sys.exit(torch.version.cuda is None)" || $(PY) -m pip install -q --no-compile "numpy<2.4"
	$(PY) -m pip install -q --no-compile -r requirements.txt
	touch $@

$(BUILT): $(DEPS) setup.py CMakeLists.txt pyproject.toml $(wildcard csrc/*/*.* csrc/include/pecker/*.h python/*.cpp)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILT)

lint: $(DEPS)
	$(PY) -m ruff check pecker_kernels tests benchmarks setup.py
	$(PY) -m ruff format --check pecker_kernels tests benchmarks setup.py

format: $(DEPS)
	$(PY) -m ruff check --fix pecker_kernels tests benchmarks setup.py
	$(PY) -m ruff format pecker_kernels tests benchmarks setup.py

test: $(BUILT) lint
	$(PY) -m pytest -q -n $(TEST_WORKERS)

# The main job (unlearn a digit with and without the saliency mask), then the kernel table.
demo: $(BUILT)
	$(PY) -m pecker_kernels demo
	$(PY) -m benchmarks.bench_step --demo

# The optimizer-step plan and the recipe's end-to-end step (under 10 minutes on the 2-core CPU machine).
bench: $(BUILT)
	$(PY) -m benchmarks.bench_step --out benchmarks/results/cpu
	$(PY) -m benchmarks.bench_recipe --out benchmarks/results/cpu

clean:
	rm -rf build *.egg-info pecker_kernels/*.so
