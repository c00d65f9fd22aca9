# linernotes: two commands set everything up.
#   make demo   build the demo corpus, train, generate, attribute, print the credits
#   make test   lint and run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
APT_PACKAGES := fluidsynth fluid-soundfont-gm
SOUNDFONT := /usr/share/sounds/sf2/FluidR3_GM.sf2
DEMO_DIR ?= demo

.PHONY: demo test lint system clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Torch first, pinned here only, so the package's range never pulls a CUDA build.
$(VENV)/.torch: $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml Makefile
	$(BIN)/pip install --quiet -e '.[dev,peers]'
	$(BIN)/pip install --quiet --no-deps kronfluence==1.0.1 basic-pitch==0.4.0
	touch $@

system:
	@if ! command -v fluidsynth >/dev/null || [ ! -f $(SOUNDFONT) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "Installing $(APT_PACKAGES) with apt-get"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends $(APT_PACKAGES)) >/dev/null; \
	  else \
	    echo "linernotes needs the Debian packages: $(APT_PACKAGES)"; \
	    echo "Install them with: sudo apt-get install --no-install-recommends $(APT_PACKAGES)"; \
	    exit 1; \
	  fi; \
	fi

# One torch thread by default: the demo's small model gains little from a second one, and two
# threads competing with any other busy process run many times slower (DEMO_THREADS=2 to try).
DEMO_THREADS ?= 1

demo: system $(VENV)/.installed
	OMP_NUM_THREADS=$(DEMO_THREADS) $(BIN)/linernotes demo --out $(DEMO_DIR)

lint: $(VENV)/.installed
	$(BIN)/ruff check .

# One torch thread per test process: tiny models gain nothing from more, and a second thread
# competing with another process slows torch down many times over.
test: system $(VENV)/.installed lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

clean-demo:
	rm -rf $(DEMO_DIR)
