# Adversa: `make run` starts the service, `make test` runs every check. Both set up what they need.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist

.PHONY: run test lint unit models reproduce bench data browser postgres redis-server install clean client

run: install data
	$(BIN)/adversa serve

# The S3 store's tests need no target here: tests/s3server.py starts moto's S3 server from the venv.
test: install data browser postgres redis-server
	$(BIN)/ruff check service workers models history tests bench contracts client
	$(BIN)/mypy
	$(BIN)/python -c "import sys, service.app, service.cli; assert 'torch' not in sys.modules, 'gateway imported torch'"
	bash tests/run.sh

lint: install
	$(BIN)/ruff check service workers models history tests bench contracts client
	$(BIN)/mypy

# The hosted defended models are made by the defense jobs' own code from the retrained fmnist-cnn
# (about 30 minutes on 2 CPU cores, mostly PGD adversarial training).
models: install data
	$(BIN)/python -m models.train
	rm -rf models/hosted/fmnist-cnn-fgsm-at models/hosted/fmnist-cnn-pgd-at \
		models/hosted/fmnist-cnn-distilled models/hosted/fmnist-cnn/1/detector.json
	$(BIN)/python -m workers.hosted
	$(BIN)/python -m workers.audit.card_eval --in-place  # the cards' robustness: APGD-CE then APGD-T

# The defense papers' results on Fashion-MNIST (docs/results/).
reproduce: install data
	$(BIN)/python -m bench.reproduce feature-squeezing
	$(BIN)/python -m bench.reproduce fgsm-training
	$(BIN)/python -m bench.reproduce distillation --n 100 --epochs 2 --limit 20000

# Every peer comparison, on the small CNN (512 images) and on the ResNet-18 (fewer images: it is
# about 20x slower per image on a CPU). Results and the commands that made them: bench/results/.
BENCH_MODULES := attacks norms apgd cw jsma blackbox
RESNET_N ?= 32
bench: install data $(BENCH_STAMP)
	$(BIN)/python -m bench.attacks
	$(BIN)/python -m bench.norms
	$(BIN)/python -m bench.apgd
	$(BIN)/python -m bench.cw
	$(BIN)/python -m bench.jsma
	$(BIN)/python -m bench.blackbox --hsj-n 64 --peer-n 32
	$(BIN)/python -m bench.headtohead
	$(BIN)/python -m bench.onediff
	$(BIN)/python -m bench.layout
	set -e; for m in $(BENCH_MODULES); do ADVERSA_BENCH_MODEL=fmnist-resnet18 \
		$(BIN)/python -m bench.$$m --n $(RESNET_N) --peer-n 8 --repeats 1 \
		$$( [ $$m = blackbox ] && echo --hsj-n 8 ); done
	ADVERSA_BENCH_MODEL=fmnist-resnet18 $(BIN)/python -m bench.headtohead --chunk 32 --chunks 2
	$(BIN)/python -m bench.byom
	$(BIN)/python -m bench.summary

install: $(STAMP)

# The torch-free client alone in its own venv (client-venv/bin/adversa-client; see the README).
client:
	@test -x client-venv/bin/python || $(PYTHON) -m venv client-venv
	client-venv/bin/pip install --quiet ./contracts ./client
	client-venv/bin/adversa-client --version


$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,clients]'
	@touch $@

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	@touch $@

# Fashion-MNIST: Debian's dataset-fashion-mnist where apt works, torchvision's downloader elsewhere.
data:
	@if [ -n "$$ADVERSA_DATA_DIR" ] && [ -e "$$ADVERSA_DATA_DIR/t10k-images-idx3-ubyte.gz" ]; then exit 0; fi; \
	if [ -e $(FMNIST_DIR)/t10k-images-idx3-ubyte.gz ] || [ -e var/data/FashionMNIST/raw/t10k-images-idx3-ubyte.gz ]; then exit 0; fi; \
	if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing dataset-fashion-mnist with apt"; \
		(apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null; \
	fi; \
	if [ ! -e $(FMNIST_DIR)/t10k-images-idx3-ubyte.gz ]; then \
		echo "downloading Fashion-MNIST with torchvision into var/data"; \
		$(BIN)/python -c "from torchvision.datasets import FashionMNIST as F; F('var/data', train=True, download=True); F('var/data', train=False, download=True)"; \
	fi

# redis-server for tests/run.sh and the fault tests (tests/integration/test_faults.py restart and
# kill their own): Debian's package where apt works and we are root.
redis-server:
	@if command -v redis-server >/dev/null; then exit 0; fi; \
	if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing redis-server with apt"; \
		(apt-get install -y -q redis-server || (apt-get update -q && apt-get install -y -q redis-server)) >/dev/null; \
	else \
		echo "note: no redis-server (needs root and apt-get: make redis-server); the fault tests will fail"; \
	fi

# Headless Chromium and its driver for the report page's browser test: Debian's packages where apt
# works and we are root; elsewhere that test skips and says how to get them.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then exit 0; fi; \
	if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium and chromium-driver with apt"; \
		(apt-get install -y -q chromium chromium-driver || (apt-get update -q && apt-get install -y -q chromium chromium-driver)) >/dev/null \
			|| echo "note: apt could not install chromium; the browser test will skip"; \
	else \
		echo "note: no chromium (needs root and apt-get: make browser); the browser test will skip"; \
	fi

# PostgreSQL on 127.0.0.1:5432 for the history tests (they run on SQLite and PostgreSQL): the one
# answering there, else Debian's postgresql installed with apt and started (password 'postgres').
postgres:
	@if command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p 5432; then exit 0; fi; \
	if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing and starting postgresql with apt"; \
		( (apt-get install -y -q postgresql || (apt-get update -q && apt-get install -y -q postgresql)) >/dev/null \
		  && service postgresql start >/dev/null \
		  && su postgres -c "psql -q -c \"ALTER USER postgres PASSWORD 'postgres'\"" ) \
			|| echo "note: could not start postgresql; the PostgreSQL history tests will skip"; \
	else \
		echo "note: no PostgreSQL on 127.0.0.1:5432 (needs root and apt-get: make postgres); its tests will skip"; \
	fi

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
