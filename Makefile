# `make run`: set up, then the main job. `make test`: set up, then lint and tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
JPEG_REGION := reslab/data/_jpeg_region.so

.PHONY: run test setup data lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP) data $(JPEG_REGION)

# Decoding only the region of a JPEG under Sec. 3.4's crop window (reslab/data/jpeg.py):
# libjpeg-turbo's own API, built against Debian's libjpeg62-turbo-dev (installed here if absent).
$(JPEG_REGION): reslab/data/jpeg_region.c
	@if [ ! -f /usr/include/jpeglib.h ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libjpeg62-turbo-dev gcc) >/dev/null; \
	fi
	$(CC) -O2 -shared -fPIC -Wall -Wextra -Werror -o $@ $< -ljpeg

# CIFAR-10 as JPEG files (`--data cifar10-jpeg`): extracted once into the ignored data/ folder,
# where reslab looks for it, when the archive is here (it cannot be downloaded). reslab checks the
# archive's SHA-256 and extracts it (reslab/data/cifar10_jpeg.py).
CIFAR10_JPEG ?= ../shared/data/cifar10-jpeg.tar.gz

# Debian's package dataset-fashion-mnist holds the original IDX files; elsewhere reslab downloads them.
data: $(STAMP)
	@if [ -d data/cifar10-jpeg/train ] && [ -d data/cifar10-jpeg/test ]; then :; \
	elif [ -f "$(CIFAR10_JPEG)" ]; then \
		$(BIN)/python -c 'import sys; from reslab.data.cifar10_jpeg import extract_copy; extract_copy(*sys.argv[1:])' \
			"$(CIFAR10_JPEG)" data/cifar10-jpeg && echo "extracted $(CIFAR10_JPEG) to data/cifar10-jpeg"; \
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
	rm -rf $(VENV) .pytest_cache $(JPEG_REGION)
