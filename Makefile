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

.PHONY: install demo test test-fast lint bench clean lock

# The demo needs the core and the plot extra; the tests the dev extra on top (transformers,
# lm-evaluation-harness, W&B and the reference libraries). --no-compile: Python compiles only what
# it imports, on first import, instead of pip compiling every file of torch and the rest up front
# (a fresh demo install: 45 s instead of 68 s; the dev extra adds about 40 s).
# Every install takes its versions from the lock of the tested set (LOCK, constraints.txt): an
# upstream release reaches this project only through `make lock`. On a GPU machine with another
# torch: make demo TORCH='torch==X' LOCK= (no lock; the versions pyproject.toml allows).
LOCK ?= constraints.txt
PIP_INSTALL := $(BIN)/pip install --quiet --no-compile $(if $(LOCK),--constraint $(LOCK))

$(VENV)/.installed-demo: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) "$(TORCH)"
	$(PIP_INSTALL) -e '.[plot]'
	touch $@

# The tests start hundreds of Python processes (ranks, workers, CLI runs): their bytecode is
# compiled once here (about a minute), so that none of them compiles torch, DeepSpeed and
# transformers again (where PYTHONDONTWRITEBYTECODE is set, none would keep what it compiled).
# Some packages ship files for other Pythons that do not compile: compileall's status is ignored.
# Left out: what no test imports (packages' own tests, transformers' models but the auto classes
# and GPT-2, pip, pygments, fontTools): 12,200 files of 19,400, 33 s instead of about a minute.
COMPILE_SKIP := /tests?/|/transformers/models/(?!auto/|gpt2/|__init__)|/site-packages/(pip|pygments|fontTools)/
$(VENV)/.installed: $(VENV)/.installed-demo
	$(PIP_INSTALL) -e '.[dev]'
	$(BIN)/python -m compileall -q -j 0 -x '$(COMPILE_SKIP)' $(VENV)/lib > /dev/null || true
	touch $@

install: $(VENV)/.installed

# The lock (constraints.txt): every package the demo, the tests and the benchmarks install, pinned,
# for Linux x86_64, Python 3.11 (what CI runs) and $(TORCH). Refresh it on purpose: after changing a
# dependency in pyproject.toml, or to take upstream's newest releases (LOCK_UPGRADE=--upgrade, the
# default; LOCK_UPGRADE= keeps every pin that still fits). Then run make test and commit both.
# uv resolves from PyPI's metadata and installs nothing.
LOCK_UPGRADE ?= --upgrade
lock:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "uv>=0.13"
	echo "$(TORCH)" | $(BIN)/uv pip compile pyproject.toml - --extra dev --extra bench $(LOCK_UPGRADE) \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--custom-compile-command "make lock" --quiet --output-file constraints.txt

# The whole pipeline on this machine (local executor): prepare -> pretrain (2 ranks, ZeRO-2) ->
# export -> fine-tune sweep -> the table and pretrained against scratch; then a text sample of the
# exported LM and its loss curves as a PNG. From a fresh clone on 2 idle cores: 37 s of install,
# 3 min 24 s of pipeline, sample and figure (2026-12-02); about 6 minutes beside other jobs.
# Re-running skips what is complete.
FINETUNE_DATA := $(and $(wildcard $(DATA)/sst2),$(wildcard $(DATA)/conll2003),$(wildcard $(DATA)/ptb))
DEMO_PROMPT ?= The history of
DEMO_FIGURE ?= $(DEMO_OUT)/loss-curves.png
# More overrides of the pipeline (stage.key=value): tests/package/test_demo.py runs a smaller demo with them.
DEMO_ARGS ?=

demo: $(VENV)/.installed-demo
	@$(if $(FINETUNE_DATA),,echo "demo: no SST-2/CoNLL-2003/PTB in $(DATA) (DATA=...): the pipeline stops after pretraining")
	$(BIN)/rnnpipe run configs/pipeline/quickstart.yaml run_dir=$(DEMO_OUT) \
		"prepare.source.paths=[$(DEMO_INPUT)]" finetune.data_root=$(DATA) \
		$(if $(FINETUNE_DATA),,'finetune.config=""') $(DEMO_ARGS)
	@echo "== sample: the exported LM continues \"$(DEMO_PROMPT)\" (seed 0, temperature 0.8)"
	@$(BIN)/rnnpipe -q sample $(DEMO_OUT)/pretrain/export --prompt "$(DEMO_PROMPT)" --tokens 300 --seed 0
	@echo "== loss curves: train and valid bits per byte of the pretraining"
	@$(BIN)/rnnpipe -q plot $(DEMO_OUT)/pretrain --out $(DEMO_FIGURE) \
		--title "make demo: LRN 2×128 pretrained on enwik8 bytes, 2 ranks"

# As root (CI), the Slurm tests run against a real local cluster (slurm/local-cluster.sh: Debian
# packages, 2 simulated nodes); elsewhere, or with SLURM_TESTS=0, they skip and say why.
SLURM_TESTS ?= 1

test: install
	$(BIN)/ruff check .
	@if [ "$(SLURM_TESTS)" = 1 ] && [ "$$(id -u)" = 0 ]; then \
		slurm/local-cluster.sh start 2 || echo "make test: no local Slurm cluster; the Slurm tests will skip"; \
	fi
	RNNPIPE_DATA=$(DATA) $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25

# Every tier on TEST_WORKERS pytest-xdist workers, a test file to a worker: much of the suite's time
# is processes starting, Slurm scheduling and sleeps, which a second worker overlaps. The Slurm
# tests (one file) thus run one after another on the one local cluster. (Not --dist loadgroup:
# pytest 9 ignores the group xdist 3.8 writes into a test's id.)
TEST_WORKERS ?= 2

# The unit tier, for the inner loop (a few minutes): tests/unit without what is marked slow
# (tests/conftest.py marks the other tiers: multiprocess, slurm, wheel). CI runs `make test`.
test-fast: install
	$(BIN)/ruff check .
	RNNPIPE_DATA=$(DATA) $(BIN)/pytest -q -n $(TEST_WORKERS) -m "not slow and not multiprocess and not slurm and not wheel" --durations=10

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# The benchmark tables (docs/benchmarks.md) and figures (docs/figures/), on this machine: about
# 12 minutes on 2 CPU cores with nothing else running (2026-12-01): the prepare table 1.5, the 3
# loss-curve runs 1-3 (LRN 34 s, minGRU 22 s alone; attention 3 min beside other jobs), the
# pretrain speed sweep 5.5 (9 runs of 12 steps), the kernel chart 1.5. Other processes on the
# cores stretch it (the loss runs took 5-11 minutes each beside a test suite). The kernel, mixer
# and LM tables take tens of minutes: python benchmarks/kernel_speed.py --write docs/benchmarks.md.
BENCH_DIR ?= /tmp/rnnpipe-bench
BENCH_ENV := RNNPIPE_PROGRESS=0
LOSS_MIXERS := lrn mingru attention
# enwik8-head with 1 % valid and test splits (41,541 bytes each), so that every evaluation is of
# the whole valid split (eval_max_tokens=0) and the final one is on the same bytes as the others.
LOSS_DATA := $(BENCH_DIR)/enwik8-head-1pc
LOSS_RUN := $(BIN)/rnnpipe -q pretrain configs/pretrain/tiny-lrn.yaml data.path=$(LOSS_DATA) \
	train.steps=500 train.log_every=10 train.eval_every=50 train.eval_max_tokens=0 train.eval_batch_size=16 \
	train.checkpoint_every=0 train.sample_tokens=0 train.resume=none overwrite=true --executor inline

bench: install
	$(BIN)/python benchmarks/prepare.py --data $(DATA) --write docs/benchmarks.md
	$(BENCH_ENV) $(BIN)/rnnpipe -q prepare configs/prepare/enwik8-head.yaml output=$(LOSS_DATA) \
		"source.paths=[$(DATA)/enwik8-head/enwik8-head.txt]" source.valid_fraction=0.01 \
		source.test_fraction=0.01 --executor inline
	for m in $(LOSS_MIXERS); do $(BENCH_ENV) $(LOSS_RUN) run_dir=$(BENCH_DIR)/$$m model.mixer=$$m || exit 1; done
	$(BIN)/rnnpipe -q plot $(addprefix $(BENCH_DIR)/,$(LOSS_MIXERS)) --out docs/figures/loss-curves.png \
		--title "enwik8-head bytes, 500 steps of 8 × 128 tokens, valid: 41,541 bytes"
	$(BIN)/python benchmarks/pretrain.py --data $(DATA) --seq-lens 128,512,2048 --steps 12 --log-every 3 \
		--budget-min 0 --write docs/benchmarks.md --plot docs/figures/pretrain-speed.png
	$(BIN)/python benchmarks/kernel_speed.py --tables kernels --repeats 2 --no-rnn --plot docs/figures/kernels-gbs.png

# Recurrence added to a pretrained GPT-2 (seed 002), on this machine: stage 1 (gpt2-tiny-cpu.yaml,
# 600 steps), then 7 stage-2 runs of 300 steps from its export (none and 3 variants at S = 64 and at
# equal positions per pass), the section in docs/results.md and docs/figures/recurrence-convergence.png.
# Sized for about 10-12 minutes on 2 quiet CPU cores; complete runs in $(BENCH_DIR)/recurrence are
# reused. A check in minutes: python benchmarks/recurrence.py --quick (writes a "quick run" section).
.PHONY: bench-recurrence
bench-recurrence: install
	$(BENCH_ENV) $(BIN)/python benchmarks/recurrence.py --data $(DATA) --runs $(BENCH_DIR)/recurrence

# Seed 000's Table 2 at CPU scale (docs/results.md): PTB at word level, three word LMs (LSTM
# forward and backward, LRN) and five fine-tuning sweeps (scratch, word2vec inputs, pretrained LSTM
# and LRN, ELMo) on PTB, five GLUE tasks and CoNLL-2003. About an hour on 2 CPU cores; complete runs
# in $(BENCH_DIR)/table2 are reused. Needs the bench extra (gensim) for the word vectors.
.PHONY: bench-table2
bench-table2: install
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BENCH_ENV) $(BIN)/python benchmarks/table2.py --data $(DATA) --runs $(BENCH_DIR)/table2

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache build
