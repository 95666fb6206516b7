# Two commands do everything, each doing all of its own set-up and safe to run again:
#   make demo   create .venv, install torch + this package (compiling the extension), run the demo
#   make test   the same set-up, then the whole test suite (Python and C++)
# Other targets: build, cpp-test, sanitize, bench, gpu-data, clean.
# Build switches pass through: USE_CUDA=0 (CPU only), FORCE_CUDA=1 (compile CUDA with no GPU),
# TORCH_CUDA_ARCH_LIST, MAX_JOBS, CUDA_HOME.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMPS := .stamps
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
DEV_DEPS := numpy pillow ninja pybind11 pytest hypothesis scipy matplotlib tqdm
MAX_JOBS ?= 2
export MAX_JOBS
export CUDA_HOME ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)

EXT_SOURCES := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' -o -name 'sources.txt' \) -not -path 'csrc/tests/*') setup.py pyproject.toml
BUILD_MODE := USE_CUDA=$(USE_CUDA) FORCE_CUDA=$(FORCE_CUDA) TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST)

.PHONY: all demo test build pytest cpp-test sanitize bench gpu-data clean FORCE
all: test

$(STAMPS)/venv:
	@mkdir -p $(STAMPS)
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $(TORCH_PIN) $(DEV_DEPS)
	@touch $@

# Rewritten only when the build switches change, so switching CPU <-> CUDA rebuilds.
$(STAMPS)/mode: FORCE
	@mkdir -p $(STAMPS)
	@echo '$(BUILD_MODE)' | cmp -s - $@ || echo '$(BUILD_MODE)' > $@

$(STAMPS)/build: $(STAMPS)/venv $(STAMPS)/mode $(EXT_SOURCES)
	$(PIP) install --no-build-isolation --no-deps -e .
	$(PY) -c "import imaml_ext; print('imaml_ext build:', imaml_ext.build_info())"
	@touch $@

build: $(STAMPS)/build

demo: build
	$(PY) -m imaml_ext.demo

pytest: build
	$(PY) -m pytest python_tests -q -rs

test: pytest cpp-test

cmake-build/build.ninja: $(STAMPS)/venv CMakeLists.txt
	cmake -S . -B cmake-build -G Ninja -DIMAML_PYTHON=$(abspath $(PY))

cpp-test: cmake-build/build.ninja
	cmake --build cmake-build -j $(MAX_JOBS)
	ctest --test-dir cmake-build --output-on-failure

# The C++ tests under AddressSanitizer + UndefinedBehaviorSanitizer (not part of CI: slow).
sanitize: $(STAMPS)/venv
	cmake -S . -B cmake-build-asan -G Ninja -DIMAML_PYTHON=$(abspath $(PY)) -DIMAML_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug
	cmake --build cmake-build-asan -j $(MAX_JOBS)
	ASAN_OPTIONS=detect_leaks=0 ctest --test-dir cmake-build-asan --output-on-failure

bench: build
	$(PIP) install -q torchopt==0.7.3 linear_operator==0.6.1 higher==0.2.1 || echo "peer libraries unavailable: the benchmarks record why"
	$(PY) benchmarks/bench_cg.py

clean:
	rm -rf build cmake-build cmake-build-asan $(STAMPS) imaml_ext/_C*.so imaml_ext/_build_meta.json

# An uncommitted copy of Omniglot's zips to carry to a lent GPU machine (benchmarks/gpu_suite.sh).
gpu-data:
	mkdir -p .cache/gpu_data/omniglot
	cp -n $${IMAML_DATA:-../shared/data}/omniglot/*.zip $${IMAML_DATA:-../shared/data}/omniglot/LICENSE .cache/gpu_data/omniglot/
