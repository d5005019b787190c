"""Per-layer outlier ratios (OWL's LOD) and OwLore sampling probabilities of a model: PNG + markdown table.

    python eval/outliers.py --model smollm2-135m-instruct --calibration demo --threshold 5
    python eval/outliers.py --model meta-llama/Llama-2-7b-hf --calibration c4 --nsamples 128 --seqlen 2048

``--calibration`` takes ``c4``, a datasets hub name, a local .txt/.json/.jsonl file, or ``demo`` (the synthetic
demo task set, offline).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from owlore.cli import entry_point, exit_code  # noqa: E402


@entry_point
def main(argv: list[str]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from owlore.data import write_demo_tasks
    from owlore.layerwise.calibration import CalibrationSpec, outlier_ratios_from_spec
    from owlore.layerwise.plotting import layer_table, plot_layer_statistics
    from owlore.layerwise.sampler import LayerSampler
    from owlore.run.sources import check_model_source

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--calibration", default="demo")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--threshold", type=float, default=5.0)
    p.add_argument("--gamma", type=int, default=5)
    p.add_argument("--mode", default="owl")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--cache-dir", default=".cache/owlore/lod")
    p.add_argument("--out", default="outputs/outliers")
    p.add_argument("--trust-remote-code", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    name = check_model_source(a.model, key="--model")
    tok = AutoTokenizer.from_pretrained(name, trust_remote_code=a.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, a.dtype),
                                                 trust_remote_code=a.trust_remote_code)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    source = a.calibration
    with tempfile.TemporaryDirectory() as tmp:
        if source == "demo":
            source = str(write_demo_tasks(tmp)["train"])
        spec = CalibrationSpec(source=source, nsamples=a.nsamples, seqlen=a.seqlen)
        t0 = time.perf_counter()
        ratios = outlier_ratios_from_spec(model, tok, spec, threshold=a.threshold, cache_dir=a.cache_dir,
                                          batch_size=4, progress=True)
        seconds = time.perf_counter() - t0
    sampler = LayerSampler(ratios, gamma=min(a.gamma, len(ratios)), mode=a.mode)
    inclusion = sampler.inclusion_probabilities()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_layer_statistics(out / "outlier_ratios.png", ratios, inclusion,
                                title=f"{a.model}: outlier ratio (M={a.threshold}) and P(in a draw), gamma={a.gamma}")
    table = layer_table(ratios.tolist(), inclusion.tolist())
    result = {"model": a.model, "threshold": a.threshold, "calibration": a.calibration, "nsamples": a.nsamples,
              "seqlen": a.seqlen, "seconds": seconds, "outlier_ratios": ratios.tolist(),
              "sampling_probabilities": sampler.probabilities.tolist(), "inclusion_probabilities": inclusion.tolist()}
    (out / "outlier_ratios.json").write_text(json.dumps(result, indent=1))
    (out / "outlier_ratios.md").write_text(table + "\n")
    print(table)
    print(f"\nmean outlier ratio {ratios.mean():.3f}%  (min {ratios.min():.3f}, max {ratios.max():.3f}); "
          f"{seconds:.1f} s\nPNG: {png}")
    return result


if __name__ == "__main__":
    raise SystemExit(exit_code(main()))
