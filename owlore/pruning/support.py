"""The generated support table of docs/pruning.md: every registered method against every model adapter.

Its own module because it reads both the registry and the adapters, which import the registry themselves.
"""

from __future__ import annotations

from owlore.pruning.models import all_adapters
from owlore.pruning.registry import _METHODS, method_names


def support_table() -> str:
    """Markdown table of every registered method: where it prunes, what it needs, on which models it runs (from
    each model adapter's ``unsupported``) and where it comes from (for docs/pruning.md)."""
    adapters = all_adapters()
    lines = ["| method | prunes | needs | " + " | ".join(a.title for a in adapters) + " | paper | idea |",
             "|---" * (5 + len(adapters)) + "|"]
    for name in method_names():
        m = _METHODS[name]
        needs = ", ".join(sorted(m.needs)) or "-"
        where = "before the LLM" if m.stage == "vision" else f"after LLM layer K (default {m.default_layer})"
        if m.then:
            where += f"; with stage2_keep, again after LLM layer K ({m.then})"
        models = " | ".join("yes" if (why := a.unsupported(m)) is None else f"no: {why}" for a in adapters)
        lines.append(f"| `{name}` | {where} | {needs} | {models} | {m.paper} | {m.summary} |")
    return "\n".join(lines)
