# make certify: set up .venv and certify every backend usable on this machine.
# make certify-seeds: full certification of every usable CPU backend on seeds 0-4.
# make test:    set up .venv and run the whole test suite (what CI runs), kernels-check included.
# make kernels-check: compile every kernel for OpenCL (PoCL), CUDA sm_80/sm_90 (NVRTC) and HIP
#               gfx90a (hipcc and hiprtc, installed with apt-get when missing); fails on any
#               error; then every Triton kernel of backends/triton ahead of time for sm_80,
#               sm_90 and gfx942, failing where a tensor-core variant has no mma/wgmma/mfma.
# make gpu-wheels: fill .whl/ with the pure-Python wheels benchmarks/gpu/check.sh installs on
#               an offline GPU machine (ml_dtypes for CPython 3.10-3.13, rich, threadpoolctl,
#               hypothesis and their dependencies); carry .whl/ along with the checkout.
# make bench:   set up .venv, time dshal and its peers side by side, print one table per
#               operator; each run's JSON is saved under .benchmarks/ (named by commit) for
#               `pytest-benchmark compare`, the last one also as .benchmarks/latest.json.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dshal-installed

.PHONY: venv test certify certify-seeds lint bench clean kernels-check gpu-wheels

venv: $(STAMP)

BACKENDS := backends/opencl backends/torch backends/ascend backends/cupy backends/cuda \
	backends/rocm backends/triton

$(STAMP): pyproject.toml setup.py dshal/backends/numpy/_native.c \
		dshal/backends/numpy/_attention.c dshal/backends/numpy/_exp2.h \
		dshal/backends/numpy/_buffer.h dshal/backends/numpy/_attention_tiles.h \
		dshal/backends/numpy/_decode.c requirements-dev.txt \
		$(addsuffix /pyproject.toml,$(BACKENDS))
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-build-isolation -e .
	$(PY) -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps \
		$(addprefix -e ,$(BACKENDS))
	touch $(STAMP)

lint: venv
	$(PY) -m ruff check .

kernels-check: venv
	@command -v hipcc >/dev/null || (apt-get update -qq && apt-get install -y -qq hipcc) \
		|| echo "kernels-check: hipcc is missing and could not be installed (apt-get install -y hipcc): the HIP target will FAIL" >&2
	$(PY) -m dshal_kernels.check
	$(PY) -m dshal_triton.aot

test: venv lint kernels-check
	$(PY) -m pytest -q -n 2 --dist loadgroup

bench: venv
	mkdir -p .benchmarks
	$(PY) -m pytest benchmarks -q -p no:randomly --benchmark-only \
		--benchmark-columns=median,min,rounds --benchmark-autosave \
		--benchmark-json=.benchmarks/latest.json

GPU_WHEEL_PYTHONS := 3.10 3.11 3.12 3.13

gpu-wheels: venv
	for v in $(GPU_WHEEL_PYTHONS); do \
		$(PY) -m pip download --quiet --disable-pip-version-check --no-deps -d .whl \
			--only-binary=:all: --python-version $$v --platform manylinux2014_x86_64 \
			ml_dtypes || exit 1; \
		$(PY) -m pip download --quiet --disable-pip-version-check -d .whl \
			--only-binary=:all: --python-version $$v --platform manylinux2014_x86_64 \
			hypothesis rich threadpoolctl exceptiongroup || exit 1; \
	done

certify: venv
	$(VENV)/bin/dshal info
	$(VENV)/bin/dshal certify

# every usable CPU backend (numpy, torch, opencl on PoCL), full certification on several seeds
# (a scheduled CI job: about a minute per backend and seed; make test keeps one full run)
CERTIFY_SEEDS ?= 0 1 2 3 4
CPU_BACKENDS ?= numpy torch opencl

certify-seeds: venv
	@status=0; for b in $(CPU_BACKENDS); do \
		if ! $(PY) -c "from dshal.registry import registry as r; import sys; \
			sys.exit(not (r.backends().get('$$b') and r.backends()['$$b'].available))"; then \
			echo "certify-seeds: $$b is not usable here, skipped"; continue; fi; \
		for s in $(CERTIFY_SEEDS); do \
			$(VENV)/bin/dshal certify $$b --full --seed $$s --out certificates/seed-$$s \
				|| status=1; \
		done; \
	done; exit $$status

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache certificates .benchmarks .whl gpu-check
