"""Validate ``owlore.memory.estimate`` against the measured peak of real short training runs.

    python benchmarks/memory_validation.py [--cases smollm2,options,wide] [--steps 3] [--out outputs/memory_validation]
        [--wide-layers 1,2,4] [--wide-dtype bfloat16] [--no-mmap-threshold] [--reuse] [--only CASE,...]

Each case is ``train.py`` in a fresh process (``owlore.benchmark.runs.run_command``: the shipped SmolLM2 config of
the method, 3 steps, no saving, no evaluation). Measured: the training peak RSS (reset at train begin) minus the
RSS once the weights are resident (``rss_after_load_bytes``, after faulting in the mmapped safetensors); also
minus the RSS at train begin (data, Trainer and peft set-up excluded). Estimated: ``estimate_run`` on the same
config, with the layers the run actually sampled (a worst-case estimate is printed too), minus the loaded weights.

Cases:

- ``smollm2``: SmolLM2-135M, fp32, batch 4 × seq 128 (packed, so every sequence is 128 tokens), for full, lora,
  galore, lisa, badam, owlore.
- ``options``: SmolLM2 OwLore with its (tied) embedding trained, alone and with each memory option
  (chunked loss, update in backward, checkpointing all / frozen, 8-bit state, factored embedding state, int8
  frozen layers).
- ``wide``: random-init models at Llama-2-7B width (hidden 4096, intermediate 11008, 32 heads, vocab 32000) with
  1, 2 and 4 decoder layers (``.cache/models/llama7b_width_L{n}``, made on first use with a small BPE tokenizer),
  batch 2 × seq 128, for owlore and lisa at γ=1 (embeddings and head train; OwLore at rank 256 with the
  randomized basis, since a full SVD of a 11008×4096 gradient takes minutes on 2 cores) and full; the measured
  per-layer slope, extrapolated to 32 layers, is compared with the estimate at 32 layers.

glibc keeps freed memory in its heap, so a freed activation can stay resident and inflate later peaks; the child
runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so that every large block is its own mapping, returned on free
(``--no-mmap-threshold`` shows the difference). Writes ``<out>/validation.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from owlore.benchmark import runs as cmp  # noqa: E402
from owlore.cli import entry_point, exit_code  # noqa: E402
from owlore.methods import names_where  # noqa: E402

logger = logging.getLogger("memory_validation")
GIB = 2**30
WIDE = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
        "vocab_size": 32000, "max_position_embeddings": 4096, "tie_word_embeddings": False}
COMMON = ["data.packing=true", "eval.demo=false", "training.logging_steps=1", "memory.profile=false"]
# every registered method but the optional extras and QLoRA (its 4-bit base is placed by a device_map, measured on
# its own elsewhere); read from the registry (owlore.methods.base.Method), so a new method is validated too
SMOLLM2_METHODS = tuple(names_where(lambda m: not m.extras and not m.memory.quantized_base))
OPTIONS = {  # SmolLM2 OwLore with its (tied) embedding trained, then each memory option on top
    "": [], "chunked_loss=256": ["memory.chunked_loss=256"],
    "update_in_backward": ["optimizer.update_in_backward=true", "training.max_grad_norm=0"],
    "checkpointing=all": ["memory.checkpointing=all"], "checkpointing=frozen": ["memory.checkpointing=frozen"],
    "state_bits=8": ["optimizer.state_bits=8"], "embedding_state=factored": ["optimizer.embedding_state=factored"],
    "frozen_weights=int8": ["memory.frozen_weights=int8"],
    "offload_activations": ["memory.checkpointing=all", "memory.offload_activations=true"]}
WIDE_METHODS = {  # the paper's OwLore (embeddings and head train, rank 256) with one sampled layer; LISA alike
    "owlore": ["owlore.gamma=1", "owlore.rank=256", "owlore.train_embeddings=true", "owlore.train_lm_head=true",
               "owlore.basis_method=randomized", "owlore.calibration_batches=2", "owlore.cache_dir=null"],
    "lisa": ["lisa.gamma=1"], "full": []}


def wide_model_dir(layers: int, dtype: str) -> Path:
    return REPO / ".cache" / "models" / f"llama7b_width_L{layers}_{dtype}"


def make_wide_model(layers: int, dtype: str) -> Path:
    """A random-init Llama at 7B width with ``layers`` decoder layers and a byte-level BPE tokenizer (ids < 4096,
    trained on the demo rows), saved once into the ignored cache."""
    out = wide_model_dir(layers, dtype)
    if (out / "config.json").is_file():
        return out
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from owlore.data.sft import load_rows

    rows = load_rows("demo", limit=1600)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<eos>", "<pad>"])
    tok.train_from_iterator((f"{r.get('instruction', '')} {r.get('input', '')} {r.get('output', '')}"
                             for r in rows), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(LlamaConfig(num_hidden_layers=layers, **WIDE), dtype=getattr(torch, dtype))
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def cases(names: list[str], wide_layers: list[int], wide_dtype: str, batch: int, seq: int) -> list[dict]:
    out = []
    if "smollm2" in names:
        out += [{"case": f"smollm2 {m}", "method": m, "batch": batch, "seq": seq, "layers": 30, "overrides": []}
                for m in SMOLLM2_METHODS]
    if "options" in names:
        out += [{"case": f"smollm2 owlore+emb {name}".rstrip(), "method": "owlore", "batch": batch, "seq": seq,
                 "layers": 30, "overrides": ["owlore.train_embeddings=true", *extra]} for name, extra in OPTIONS.items()]
    if "wide" in names:
        for method, extra in WIDE_METHODS.items():
            for n in wide_layers:
                out.append({"case": f"7B-width L{n} {method}", "method": method, "batch": 2, "seq": seq,
                            "layers": n, "wide": (n, wide_dtype),
                            "overrides": [f"model.dtype={wide_dtype}", "training.bf16=false", *extra]})
    return out


def run_case(case: dict, args: argparse.Namespace) -> dict:
    """Train one case in a fresh process and compare its record with the estimate."""
    from owlore.memory.estimator import estimate_run
    from owlore.run.recipe import load_config

    out_dir = args.out / case["case"].replace(" ", "_")
    overrides = [*COMMON, *case["overrides"]]
    if "wide" in case:
        overrides.append(f"model.name={make_wide_model(*case['wide'])}")
    cmd = cmp.run_command(case["method"], steps=args.steps, batch=case["batch"], seq=case["seq"],
                          output_dir=out_dir, config_dir=REPO / "configs", base=REPO / "configs" / "smollm2.yaml",
                          overrides=overrides, script=str(REPO / "train.py"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    if not args.no_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out_dir.mkdir(parents=True, exist_ok=True)
    record_path, command_path = out_dir / "owlore_record.json", out_dir / "command.txt"
    start, rc = time.perf_counter(), 0
    stamp = f"{shlex.join(cmd)}\nMALLOC_MMAP_THRESHOLD_={env.get('MALLOC_MMAP_THRESHOLD_')}"
    same = command_path.is_file() and command_path.read_text() == stamp
    if not (args.reuse and same and record_path.is_file()):  # --reuse: estimate again from the earlier record
        record_path.unlink(missing_ok=True)
        with (out_dir / "train.log").open("w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env).returncode
        command_path.write_text(stamp)
        shutil.rmtree(out_dir / "final", ignore_errors=True)  # only the record is read; a 7B-width model is GBs
    row = {**case, "command": shlex.join(cmd), "returncode": rc, "seconds": time.perf_counter() - start}
    if rc != 0 or not record_path.is_file():
        row["error"] = cmp.tail((out_dir / "train.log").read_text(errors="replace"))
        return row
    summary = json.loads(record_path.read_text())["summary"]
    config_files = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--config"]
    cfg = load_config(config_files, [a for a in cmd[3:] if "=" in a and not a.startswith("--")])
    active = summary.get("layers_sampled")
    # on a GPU the peak is torch.cuda.max_memory_allocated and the baseline the bytes allocated at train begin
    # (the weights on the device); on a CPU the peak RSS and the RSS once the weights are resident
    device = "cuda" if summary.get("memory_kind") == "cuda" else "cpu"
    baseline = summary["memory_at_train_begin_bytes" if device == "cuda" else "rss_after_load_bytes"]
    as_run = estimate_run(cfg, device=device, **({"active_layers": tuple(active)} if active else {}))
    worst = estimate_run(cfg, device=device)
    loaded = estimate_run(cfg, device=device, frozen_int8=False).weights
    peak = summary["train_peak_memory_bytes"]
    row.update(measured_peak=peak, rss_after_load=summary["rss_after_load_bytes"], memory_kind=device,
               train_begin=summary["memory_at_train_begin_bytes"], active_layers=active,
               measured_above_load=peak - baseline,
               measured_above_begin=peak - summary["memory_at_train_begin_bytes"],
               estimate_above_load=_above_load(as_run, loaded), estimate_worst_above_load=_above_load(worst, loaded),
               estimate_total=as_run.total, estimate_weights=as_run.weights, peak_moment=as_run.peak_moment,
               estimate_table=as_run.table())
    row["error_pct"] = 100 * (row["estimate_above_load"] / row["measured_above_load"] - 1)
    if "wide" in case:
        from owlore.memory.estimator import estimate
        from owlore.memory.estimator import run_options as opts_of
        from owlore.memory.shapes import ModelShape

        dtype, batch, seq, opts = opts_of(cfg)
        shape = ModelShape.from_config({**WIDE, "num_hidden_layers": 32}, name="7B width, 32 layers")
        row["estimate_32_above_load"] = _above_load(estimate(shape, method=case["method"], dtype=dtype, batch=batch,
                                                             seq=seq, **{**opts, "device": device}))
    return row


def _above_load(est, loaded: int | None = None) -> int:
    """The estimate minus what the loaded checkpoint holds (``loaded``, default the estimate's weights; LoRA
    adapters are added after loading). On a CPU the host is the device: frozen_int8's exact weights are the
    loaded ones, its int8 copies come on top (pass ``loaded`` from the run without it)."""
    adapters = sum(b for c, name, b in est.items if c == "weights" and name == "LoRA adapters")
    return est.total + est.host - ((est.weights if loaded is None else loaded) - adapters)


def slopes(rows: list[dict]) -> list[dict]:
    """Per method: the least-squares line of the measured peak over load vs decoder layers, taken to 32."""
    out = []
    for method in WIDE_METHODS:
        pts = [(r["layers"], r["measured_above_load"], r) for r in rows if "wide" in r and r["method"] == method
               and "measured_above_load" in r]
        if len(pts) < 2:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        at32 = my + slope * (32 - mx)
        est32 = pts[0][2]["estimate_32_above_load"]
        out.append({"method": method, "slope_per_layer": slope, "intercept": my - slope * mx,
                    "measured_extrapolated_32": at32, "estimate_32": est32, "error_pct": 100 * (est32 / at32 - 1)})
    return out


def render(rows: list[dict], lines_fit: list[dict], args: argparse.Namespace) -> str:
    g = lambda b: f"{b / GIB:.3f}" if isinstance(b, int | float) else "–"  # noqa: E731
    md = ["# Memory estimate vs measured peak (CPU RSS)", "",
          f"{args.steps} steps per run; MALLOC_MMAP_THRESHOLD_={'unset' if args.no_mmap_threshold else '65536'}.",
          "", "| case | measured peak − load (GiB) | estimate (GiB) | error | worst-case estimate (GiB) | "
              "measured peak − train begin (GiB) | estimated peak moment | active layers |",
          "|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        if "measured_above_load" not in r:
            md.append(f"| {r['case']} | failed (exit {r['returncode']}) | | | | | | |")
            continue
        flag = "" if abs(r["error_pct"]) <= 15 else " ⚠"
        md.append(f"| {r['case']} | {g(r['measured_above_load'])} | {g(r['estimate_above_load'])} | "
                  f"{r['error_pct']:+.1f} %{flag} | {g(r['estimate_worst_above_load'])} | "
                  f"{g(r['measured_above_begin'])} | {r['peak_moment']} | {r['active_layers'] or 'all'} |")
    if lines_fit:
        md += ["", "## 7B width: measured slope per decoder layer, extrapolated to 32 layers", "",
               "| method | slope (GiB/layer) | intercept (GiB) | measured @32 (GiB) | estimate @32 (GiB) | error |",
               "|---|---:|---:|---:|---:|---:|"]
        md += [f"| {f['method']} | {g(f['slope_per_layer'])} | {g(f['intercept'])} | "
               f"{g(f['measured_extrapolated_32'])} | {g(f['estimate_32'])} | {f['error_pct']:+.1f} % |"
               for f in lines_fit]
    md += ["", "## Commands", ""] + [f"- `{r['command']}`" for r in rows]
    failed = [r for r in rows if "error" in r]
    for r in failed:
        md += ["", f"### {r['case']} failed", "", "```", r["error"], "```"]
    return "\n".join(md) + "\n"


@entry_point
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="smollm2,options,wide", help="comma-separated: smollm2, options, wide")
    p.add_argument("--only", default="", help="comma-separated case names to run (e.g. 'smollm2 full')")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4, help="SmolLM2 batch")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--wide-layers", default="1,2,4")
    p.add_argument("--wide-dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "memory_validation")
    p.add_argument("--no-mmap-threshold", action="store_true", help="leave glibc's malloc defaults in the child")
    p.add_argument("--reuse", action="store_true",
                   help="skip the training of a case whose record exists from the same command; estimate again")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout, force=True)
    todo = cases(args.cases.split(","), [int(x) for x in args.wide_layers.split(",")], args.wide_dtype,
                 args.batch, args.seq)
    if args.only:
        todo = [c for c in todo if c["case"] in args.only.split(",")]
    rows = []
    for case in todo:  # one at a time: each run's RSS must not compete with another's
        logger.info("running %s", case["case"])
        rows.append(run_case(case, args))
        r = rows[-1]
        if "error_pct" in r:
            logger.info("%s: measured %.3f GiB, estimate %.3f GiB (%+.1f %%)", r["case"],
                        r["measured_above_load"] / GIB, r["estimate_above_load"] / GIB, r["error_pct"])
        else:
            logger.error("%s failed:\n%s", r["case"], r.get("error"))
    fit = slopes(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "validation.json").write_text(json.dumps({"rows": rows, "slopes": fit}, indent=1, default=str))
    text = render(rows, fit, args)
    (args.out / "validation.md").write_text(text)
    print(text)
    return int(any("error" in r for r in rows))


if __name__ == "__main__":
    raise SystemExit(exit_code(main()))
