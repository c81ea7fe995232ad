# The two commands of the README. Each creates (or reuses) .venv and installs what it needs.
#   make book   runs every notebook on the embedded mini world and builds _build/html/index.html
#   make test   runs the test suite (every notebook included, under the smoke profile)
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
PROFILE ?= mini

# CPU machines install through constraints.txt, which pins the locally cached CPU wheel of torch.
# On a machine with an NVIDIA driver the constraints are skipped, so its own CUDA torch is kept.
CONSTRAINTS := $(if $(shell command -v nvidia-smi 2>/dev/null),,-c constraints.txt)

.PHONY: book test clean

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(CONSTRAINTS) -e '.[test]'
	touch $@

book: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/w2w book --profile $(PROFILE)
	@echo "The book is at _build/html/index.html"

test: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

clean:
	rm -rf _build
