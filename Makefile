# Two commands on a fresh machine: `make demo` and `make test`. Each sets itself up:
# a .venv, torch first (pinned: an unpinned torch pulls GBs of CUDA wheels), then rnnpipe.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
DATA ?= ../shared/data
BIN := $(VENV)/bin
# The demo corpus: enwik8's first 4 MB where ../shared/data has it, else enwik8 from its public address.
DEMO_INPUT ?= $(if $(wildcard $(DATA)/enwik8-head/enwik8-head.txt),$(DATA)/enwik8-head/enwik8-head.txt,zip://enwik8::https://mattmahoney.net/dc/enwik8.zip)
DEMO_OUT ?= runs/demo

.PHONY: install demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/rnnpipe prepare configs/demo.yaml output=$(DEMO_OUT)/data "source.paths=[$(DEMO_INPUT)]"
	$(BIN)/rnnpipe verify $(DEMO_OUT)/data
	$(BIN)/rnnpipe pretrain configs/pretrain/tiny-lrn.yaml run_dir=$(DEMO_OUT)/pretrain \
		data.path=$(DEMO_OUT)/data distributed.nproc=2 train.zero_stage=2
	$(BIN)/rnnpipe export $(DEMO_OUT)/pretrain $(DEMO_OUT)/model
	@if [ -d "$(DATA)/sst2" ] && [ -d "$(DATA)/conll2003" ] && [ -d "$(DATA)/ptb" ]; then \
		$(BIN)/rnnpipe finetune configs/finetune/demo.yaml out_dir=$(DEMO_OUT)/finetune \
			pretrained=$(DEMO_OUT)/model data_root=$(DATA); \
	else \
		echo "finetune skipped: it needs SST-2, CoNLL-2003 and PTB in $(DATA) (DATA=...)"; \
	fi

# As root (CI), the Slurm tests run against a real local cluster (slurm/local-cluster.sh: Debian
# packages, 2 simulated nodes); elsewhere, or with SLURM_TESTS=0, they skip and say why.
SLURM_TESTS ?= 1

test: install
	$(BIN)/ruff check .
	@if [ "$(SLURM_TESTS)" = 1 ] && [ "$$(id -u)" = 0 ]; then \
		slurm/local-cluster.sh start 2 || echo "make test: no local Slurm cluster; the Slurm tests will skip"; \
	fi
	RNNPIPE_DATA=$(DATA) $(BIN)/pytest -q

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: install
	$(BIN)/python benchmarks/prepare.py --data $(DATA) --write docs/benchmarks.md

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
