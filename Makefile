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

# The whole pipeline on this machine (local executor): prepare -> pretrain (2 ranks, ZeRO-2) ->
# export -> fine-tune sweep -> the table. Re-running skips what is complete.
FINETUNE_DATA := $(and $(wildcard $(DATA)/sst2),$(wildcard $(DATA)/conll2003),$(wildcard $(DATA)/ptb))

demo: install
	@$(if $(FINETUNE_DATA),,echo "demo: no SST-2/CoNLL-2003/PTB in $(DATA) (DATA=...): the pipeline stops after pretraining")
	$(BIN)/rnnpipe run configs/pipeline/quickstart.yaml run_dir=$(DEMO_OUT) \
		"prepare.source.paths=[$(DEMO_INPUT)]" finetune.data_root=$(DATA) \
		$(if $(FINETUNE_DATA),,'finetune.config=""')

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
