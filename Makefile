# `make run`: set up, then the main job. `make test`: set up, then lint and tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test setup data lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP) data

# CIFAR-10 as JPEG files (`--data cifar10-jpeg`): extracted once into the ignored data/ folder,
# where reslab looks for it, when the archive is here (it cannot be downloaded).
CIFAR10_JPEG ?= ../shared/data/cifar10-jpeg.tar.gz
CIFAR10_JPEG_SHA256 := 58c58e3af3ec7ed2054f439f35ad3c83dc1ab019f4af6037f60612ea098c8fa1

# Debian's package dataset-fashion-mnist holds the original IDX files; elsewhere reslab downloads them.
data:
	@if [ -f data/cifar10-jpeg/.extracted ]; then :; \
	elif [ -f "$(CIFAR10_JPEG)" ]; then \
		echo "$(CIFAR10_JPEG_SHA256)  $(CIFAR10_JPEG)" | sha256sum -c --quiet && \
		rm -rf data/.cifar10-jpeg.part && mkdir -p data/.cifar10-jpeg.part && \
		tar xzf "$(CIFAR10_JPEG)" -C data/.cifar10-jpeg.part --no-same-owner train test && \
		touch data/.cifar10-jpeg.part/.extracted && rm -rf data/cifar10-jpeg && \
		mv data/.cifar10-jpeg.part data/cifar10-jpeg && echo "extracted $(CIFAR10_JPEG) to data/cifar10-jpeg"; \
	else \
		echo "note: no $(CIFAR10_JPEG); --data cifar10-jpeg needs it (make data CIFAR10_JPEG=PATH)"; \
	fi
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null || \
		echo "note: could not install dataset-fashion-mnist; reslab will download Fashion-MNIST"; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .

test: setup lint
	$(BIN)/python -m pytest -q

# The main job: ResNet-20 on Fashion-MNIST, the paper's recipe scaled to 4,500 iterations.
run: setup
	$(BIN)/reslab train resnet20 --data fashion-mnist --recipe quick --out runs/make-run

clean:
	rm -rf $(VENV) .pytest_cache
