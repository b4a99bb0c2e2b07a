# Two commands do all set-up on a fresh machine (Python 3.10+ with pip, no root needed):
#   make quickstart   install into .venv, then train the quickstart VAE on the embedded dataset
#   make test         install into .venv (with the test extras), then run the test suite
VENV   ?= .venv
PYTHON ?= python3
# torch goes in first, on its own: a bare `torch` requirement would pull a multi-GB CUDA build
# onto a machine without a GPU. Where the CPU wheel of 2.13.0 lies on disk, pip takes it; on a
# GPU machine, set TORCH to the build you want (e.g. TORCH="torch==2.13.0").
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install quickstart test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[train,dev]"
	touch $@

# `accelerate launch` sets OMP_NUM_THREADS=1 unless told otherwise, which halves the speed of a
# one-process CPU run on two cores: give that process every core.
quickstart: install
	$(BIN)/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		--num_cpu_threads_per_process $$(nproc) pipeline/train.py --config configs/quickstart.yaml

# The tests start real servers: nginx serves shards over HTTP, and a single-host Slurm (munged,
# slurmctld, slurmd) runs slurm/train.sbatch. CI runs as root and installs them from Debian;
# elsewhere install them yourself, or those tests are skipped (and say so).
# Fashion-MNIST comes from ../shared/data beside the checkout, else from Debian's package.
test: install
	@if ! command -v nginx >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null; fi
	@if ! { command -v slurmctld && command -v munged; } >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null; fi
	@if [ ! -e ../shared/data/fashion-mnist ] && [ ! -e /usr/share/datasets/fashion-mnist ] && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; fi
	$(BIN)/python -m pytest -q -rs --durations=20 tests

clean:
	rm -rf $(VENV) runs .pytest_cache
