"""Every method's run config on one base, so the estimator can put them side by side (``--compare-methods``,
``--fit``): the base files plus each method's ``configs/paper/<method>.yaml`` overlay, and OwLore with each
memory option.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from owlore.memory.estimator import MemoryEstimate, estimate_run

PAPER_DIR = Path(__file__).resolve().parents[2] / "configs" / "paper"
METHOD_SECTIONS = ("owlore", "lora", "quantization", "galore", "lisa", "badam", "optimizer")
PUBLISHED = {  # each paper's own setting (batch, sequence, hardware), so a guide rather than a target
    "owlore": "21 GB (OwLore abstract, arXiv 2405.18380)",
    "badam": "21.8 GB (BAdam, arXiv 2404.02827)",
    "full": "≥ 60 GB (LISA abstract, arXiv 2403.17919: a 7B model, full-parameter)",
    "galore 8-bit, in-backward, checkpointing": "22.8 GB (GaLore, arXiv 2403.03507; as cited in the issue)",
}
PUBLISHED_ONLY = [("Q-GaLore", "15.1 GB (arXiv 2407.08296; as cited in the issue)"),
                  ("APOLLO", "< 12 GB (arXiv 2412.05270 abstract: pre-training LLaMA-7B, quantized weights)")]
OWLORE_OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("owlore, no checkpointing", {"checkpointing": "off"}),
    ("owlore, memory.checkpointing=frozen", {"checkpointing": "frozen"}),
    ("owlore, optimizer.state_bits=8", {"state_bits": 8}),
    ("owlore, optimizer.update_in_backward", {"update_in_backward": True}),
    ("owlore, embedding_state=8bit", {"embedding_state": "8bit"}),
    ("owlore, embedding_state=lowrank", {"embedding_state": "lowrank"}),
    ("owlore, embedding_state=factored", {"embedding_state": "factored"}),
    ("owlore, memory.chunked_loss=2048", {"chunked_loss": 2048}),
    ("owlore, frozen_int8", {"frozen_int8": True}),
    ("owlore, all of the above (8-bit, in-backward, factored, chunked, int8)",
     {"state_bits": 8, "update_in_backward": True, "embedding_state": "factored", "chunked_loss": 2048,
      "frozen_int8": True}),
]


def method_config(configs: list[str], overrides: list[str], method: str, own: str) -> Any:
    """The run config of ``method`` on the same base: the given files plus the method's paper overlay (if
    shipped), without the sections the method does not read and with its optimizer section at the defaults."""
    from owlore.methods import get_method
    from owlore.run.recipe import load_config

    if method == own:
        return load_config(configs, overrides)
    overlay = PAPER_DIR / f"{method}.yaml"
    sections = get_method(method).all_sections()
    drop = [f"{s}=null" for s in METHOD_SECTIONS if s not in sections or s == "optimizer"]
    files = [*configs, str(overlay)] if overlay.is_file() else configs
    return load_config(files, [*overrides, *drop, f"method={method}"])


def compare(configs: list[str], overrides: list[str]) -> list[tuple[str, MemoryEstimate | None, str]]:
    """(row name, estimate, published figure) for every method, then OwLore with each option."""
    from owlore.methods import REGISTRY
    from owlore.run.recipe import load_config

    base = load_config(configs, overrides)
    rows: list[tuple[str, MemoryEstimate | None, str]] = []
    for method in REGISTRY:
        cfg = method_config(configs, overrides, method, base.method)
        rows.append((method, estimate_run(cfg), PUBLISHED.get(method, "")))
        if method == "full" and (cfg.model.dtype == "float32"):
            rows.append(("full, pure bf16 (bf16 weights and AdamW moments)",
                         estimate_run(cfg, dtype="bfloat16", autocast=False), ""))
        if method == "galore":
            name = "galore 8-bit, in-backward, checkpointing"
            rows.append((name, estimate_run(cfg, state_bits=8, update_in_backward=True, checkpointing="all"),
                         PUBLISHED[name]))
    owlore = base if base.method == "owlore" else method_config(configs, overrides, "owlore", base.method)
    rows += [(name, estimate_run(owlore, **opts), "") for name, opts in OWLORE_OPTIONS]
    rows += [(name, None, fig) for name, fig in PUBLISHED_ONLY]
    return rows
