# lnsp: every target that needs Python depends on the virtual environment, which is
# created (and refilled when pyproject.toml or constraints.txt change) on first use.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?=
VENV   := .venv
BIN    := $(VENV)/bin
LNSP   := $(BIN)/lnsp
STAMP  := $(VENV)/.installed

DATA   ?= data/demo
RUN    ?= runs/$(shell date +%Y%m%d-%H%M%S)
EPOCHS ?=
NPROC  ?= 2
NODES  ?= 2
NPROC_PER_NODE ?= 1
ARGS   ?=
OFFLINE_BASE ?= lnsp-base:bookworm
PORT   ?= 6006
TRAIN_FLAGS = --data $(DATA) --run-dir $(RUN) $(if $(EPOCHS),--epochs $(EPOCHS)) $(ARGS)
TARGET = $(if $(PID),$(PID),$(RUN))
# CMD="python train.py --lr 3e-4": the launch targets run your own command under the
# guard instead of lnsp's trainer (ARGS= then takes the guard's flags, e.g. --max-restarts 2).
CMD    ?=
LAUNCH_FLAGS = $(if $(CMD),--run-dir $(RUN) $(ARGS) -- $(CMD),$(TRAIN_FLAGS))
DEMO_DATA = $(if $(CMD),,$(if $(filter data/demo,$(DATA)),data/demo/bank.npy))

help: ## show this help
	@echo "usage: make TARGET [DATA=dir] [RUN=runs/name] [EPOCHS=n] [PID=n] [ARGS='--flag v'] [CMD='python train.py']"
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "}; {printf "  %-17s %s\n", $$1, $$2}'

# A .venv made by a Python older than 3.11 (Apple's 3.9 on macOS) is made anew: its
# pyvenv.cfg says which Python made it.
OLD_VENV := $(shell awk -F' *= *' '$$1 == "version" { split($$2, v, "."); if (v[1] < 3 || (v[1] == 3 && v[2] < 11)) print "old" }' $(VENV)/pyvenv.cfg 2>/dev/null)

# PYTHON= chooses the interpreter; by default the first >= 3.11 (scripts/find-python.sh).
$(STAMP): pyproject.toml constraints.txt $(if $(OLD_VENV),FORCE)
	@if ! { test -x $(BIN)/pip && test -z "$(OLD_VENV)"; }; then \
		py=$$(scripts/find-python.sh $(PYTHON)) || exit 2; \
		echo "$$py -m venv --clear $(VENV)  # none yet, cut short (no pip), or made by a Python < 3.11"; \
		$$py -m venv --clear $(VENV) || exit 1; \
	fi
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,plot,text,tensorboard]'
	@# macOS: faiss loads torch's libomp, one OpenMP runtime per process (a no-op elsewhere)
	$(BIN)/python -c "from lnsp.system import share_openmp; [print('linked', x) for x in share_openmp()]"
	touch $@

setup: $(STAMP) ## create .venv and install the pinned dependencies

data/demo/bank.npy: | $(STAMP)
	$(LNSP) data synth --out data/demo

data: data/demo/bank.npy ## write the deterministic demo data set into data/demo

data-text: $(STAMP) ## a data directory from your text (SRC=folder or .jsonl, OUT=dir, ARGS=)
	@test -n "$(SRC)" -a -n "$(OUT)" || { echo "make data-text SRC=folder-or.jsonl OUT=data/name"; exit 2; }
	$(LNSP) data from-text $(SRC) --out $(OUT) $(ARGS)

train: $(STAMP) $(if $(filter data/demo,$(DATA)),data/demo/bank.npy) ## train in the foreground (DATA=, RUN=, EPOCHS=)
	$(LNSP) train $(TRAIN_FLAGS)

run: $(STAMP) ## your own command under the guard, in the foreground (CMD="python train.py ...", RUN=, ARGS=)
	@test -n "$(CMD)" || { echo 'make run CMD="python train.py ..." [RUN=runs/name] [ARGS="--max-restarts 2"]'; exit 2; }
	$(LNSP) run --run-dir $(RUN) $(ARGS) -- $(CMD)

# Two workers: in one process a core idles while a test waits out a real stall or a
# container. The container tests share one worker (one image), the torchrun tests another.
WORKERS ?= 2
test: $(STAMP) ## run the test suite (WORKERS=2 pytest-xdist workers; WORKERS=0 in this process)
	$(BIN)/python -m pytest -n $(WORKERS) $(ARGS)

test-quick: $(STAMP) ## the edit loop: the tests that start no process beyond pytest (about a minute)
	set -o pipefail; LNSP_TEST_QUICK=1 $(BIN)/python -m pytest -n $(WORKERS) -q -rs $(ARGS) | \
		sed '/^SKIPPED.*(make test-quick runs none)$$/d'

COUNT ?= 10
TESTS ?=
test-stress: $(STAMP) ## the signal, stall, kill and launch tests COUNT times in a row (COUNT=10, WORKERS=2, TESTS=files)
	WORKERS=$(WORKERS) TESTS="$(TESTS)" scripts/test-stress.sh $(COUNT)

probe: $(STAMP) ## one training step with per-phase timings (PROBE RESULT)
	$(LNSP) probe $(ARGS)

train-nohup: $(STAMP) $(DEMO_DATA) ## detached run: nohup (+ caffeinate on macOS); CMD= for your own command
	$(LNSP) launch nohup $(LAUNCH_FLAGS)

train-tmux: $(STAMP) $(DEMO_DATA) ## detached run in a tmux session (SESSION=); CMD= for your own command
	$(LNSP) launch tmux $(if $(SESSION),--session $(SESSION)) $(LAUNCH_FLAGS)

train-docker: $(STAMP) $(DEMO_DATA) ## detached run in a Linux container (image built when missing; IMAGE=); CMD= for your own command
	$(if $(IMAGE),,$(LNSP) image ensure)
	$(LNSP) launch docker $(if $(IMAGE),--image $(IMAGE)) $(LAUNCH_FLAGS)

train-ddp: $(STAMP) $(DEMO_DATA) ## data-parallel run under torchrun (NPROC=2); CMD= for your own script
	$(LNSP) launch ddp --nproc $(NPROC) $(LAUNCH_FLAGS)

train-ddp-docker: $(STAMP) $(if $(filter data/demo,$(DATA)),data/demo/bank.npy) ## torchrun nodes as containers on a network of the run's own (NODES=2; image built when missing)
	$(LNSP) image ensure $(if $(IMAGE),--tag $(IMAGE))
	$(LNSP) launch ddp-docker --nodes $(NODES) --nproc-per-node $(NPROC_PER_NODE) $(TRAIN_FLAGS) $(if $(IMAGE),--image $(IMAGE))

status: $(STAMP) ## state of every run under runs/ (or RUN=; ARGS=--watch for a live view)
	$(LNSP) status $(if $(filter command line environment,$(origin RUN)),$(RUN)) $(ARGS)

watch: $(STAMP) ## live view of every run, redrawn every 2 s (Ctrl-C leaves)
	$(LNSP) status --watch $(if $(filter command line environment,$(origin RUN)),$(RUN)) $(ARGS)

# This machine only: the event files hold the config and the run's figures. HOST=0.0.0.0
# (or an address of yours) serves them to the network, on purpose.
HOST ?= 127.0.0.1
tensorboard: $(STAMP) ## serve runs/ in TensorBoard on this machine only (PORT=6006, HOST=127.0.0.1)
	$(BIN)/tensorboard --logdir runs --port $(PORT) --host $(HOST)

dump: $(STAMP) ## all-thread stack dump of a live run (PID= or RUN=); it keeps running
	@test -n "$(PID)$(filter command line environment,$(origin RUN))" || { echo "make dump PID=... or RUN=..."; exit 2; }
	$(LNSP) dump $(TARGET) $(ARGS)

stop: $(STAMP) ## graceful stop: SIGTERM, checkpoint, SIGKILL after the grace (RUN=)
	@test -n "$(filter command line environment,$(origin RUN))" || { echo "make stop RUN=..."; exit 2; }
	$(LNSP) stop $(RUN) $(ARGS)

logs: $(STAMP) ## print a run's log (RUN=, ARGS=-f to follow)
	@test -n "$(filter command line environment,$(origin RUN))" || { echo "make logs RUN=..."; exit 2; }
	$(LNSP) logs $(RUN) $(ARGS)

diagnose: $(STAMP) ## why a Python process is stuck: VERDICT, evidence, fix (PID= or RUN=)
	@test -n "$(PID)$(filter command line environment,$(origin RUN))" || { echo "make diagnose PID=... or RUN=..."; exit 2; }
	$(LNSP) diagnose $(TARGET) $(ARGS)

doctor: $(STAMP) ## threads, BLAS/OpenMP runtimes, tools, known hazards
	$(LNSP) doctor $(ARGS)

docker-build: $(STAMP) ## build the image lnsp:latest through docker-py (BASE_IMAGE=)
	$(LNSP) image build $(if $(BASE_IMAGE),--base-image $(BASE_IMAGE))

image: $(STAMP) ## build lnsp:latest when missing or out of date (online, else offline)
	$(LNSP) image ensure

docker-base: ## offline Python 3.11 base image from Debian packages (debootstrap; root)
	scripts/make-base-image.sh $(OFFLINE_BASE)

wheelhouse: $(STAMP) ## download the image's wheels into .cache/wheelhouse
	scripts/make-wheelhouse.sh

docker-offline: docker-base wheelhouse ## build the image with no registry: base + wheelhouse
	$(LNSP) image build --base-image $(OFFLINE_BASE)

gpu-check: $(STAMP) ## what needs NVIDIA GPUs: probe, 1-GPU run, 2-GPU DDP on NCCL (PASS/FAIL)
	scripts/gpu-check.sh

compare: $(STAMP) ## the probe natively and in the container, side by side (image built when missing)
	$(LNSP) image ensure
	$(LNSP) compare $(ARGS)

realtext: $(STAMP) ## the real-text rows of docs/results.md: man pages and numpy/torch docstrings, trained at defaults
	scripts/realtext.sh

bench: $(STAMP) ## throughput ratios, vs a plain user loop, thread policies, FLOP fraction, auto miner at scale (bench.json)
	$(LNSP) bench $(ARGS)

plot: $(STAMP) ## redraw a run's plots.png (RUN=)
	@test -n "$(filter command line environment,$(origin RUN))" || { echo "make plot RUN=..."; exit 2; }
	$(LNSP) plot $(RUN)

generate: $(STAMP) ## dual-path generation from RUN=...'s best.pt (ARGS='--steps 20 --lane neutral')
	@test -n "$(filter command line environment,$(origin RUN))" || { echo "make generate RUN=..."; exit 2; }
	$(LNSP) generate --checkpoint $(RUN)/checkpoints/best.pt --data $(DATA) $(ARGS)

calibrate: $(STAMP) ## measure RUN=...'s decider thresholds again on its held-out windows
	@test -n "$(filter command line environment,$(origin RUN))" || { echo "make calibrate RUN=..."; exit 2; }
	$(LNSP) calibrate --checkpoint $(RUN)/checkpoints/best.pt --data $(DATA) $(ARGS)

clean: ## remove caches (keeps runs/, data/ and .venv)
	rm -rf .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

FORCE:

.PHONY: FORCE help setup data data-text train run test test-stress probe train-nohup train-tmux train-docker train-ddp status \
	watch tensorboard image dump diagnose stop \
	logs doctor realtext docker-build docker-base wheelhouse docker-offline compare bench plot generate calibrate clean
