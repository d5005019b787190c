#!/usr/bin/env bash
# The quality sweeps in priority order; each call resumes where the last one stopped (finished runs are skipped).
# ~6-20 min per run on our 2-core CPU (full FT slowest): the whole plan is ~44 runs, about 7 hours.
set -u
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
bench() { .venv/bin/python eval/bench.py "$@" || echo "eval/bench.py $*: some runs failed or are not done"; }
M=benchmarks/sweeps/manpages_methods.yaml S=benchmarks/sweeps/owlore_sampling.yaml
bench --sweep $M --passes 1 --only full,owlore,lisa,badam   # the layer-wise methods against full FT
bench --sweep $S --only uniform,reversed --max-runs 2         # seed 0 of the sampling ablation
bench --sweep $M --passes 1                                   # every other method at its first learning rate
bench --sweep $S                                              # all seeds of the sampling ablation
bench --sweep benchmarks/sweeps/owlore_ablations.yaml         # OwLore's knobs one at a time
bench --sweep benchmarks/sweeps/owlore_tuned.yaml             # the best two knobs together, 3 seeds
bench --sweep $M                                              # the rest of the learning-rate grid
bench --sweep benchmarks/sweeps/nodejs_methods.yaml --passes 1                  # the domain task, first lr
bench --sweep benchmarks/sweeps/nodejs_methods.yaml                             # and its grid
