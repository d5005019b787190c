"""The method registry: one registration per pruning method, read by the pruner, FLOPs accounting, benchmarks and docs.

A method is a module that scores and selects tokens on plain tensors and ends with one :func:`register` call saying
what it needs from the model (vision attention, projected features, the text prompt) and what its selection costs.
``VisualTokenPruner`` computes only what the chosen method declares, ``flops.selection_flops`` and
``eval/vlm_pruning.py`` read the same entry, and ``owlore.pruning.support.support_table`` writes the docs table. Adding a method is a new
module plus its name in ``BUILTIN_MODULES`` (modules register themselves on import, like peft's tuner mapping).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch import nn

    from owlore.pruning.flops import VisionShape
    from owlore.pruning.llava import VisionEncoding

__all__ = [
    "BUILTIN_MODULES",
    "NEEDS",
    "PruningMethod",
    "Selection",
    "SelectionContext",
    "get_method",
    "method_names",
    "register",
]

BUILTIN_MODULES = ("select", "fastervlm", "fopru", "divprune", "zoo", "cdpruner", "visionzip", "fastv", "dart",
                   "holov", "mmtok", "vscan")
"""``owlore.pruning.<module>`` files that register the built-in methods."""

NEEDS = {
    "attention": "queries/keys of one vision-tower layer (recomputed from a hook; the tower keeps SDPA)",
    "shallow_attention": "queries/keys of a shallow vision-tower layer as well (option shallow_layer)",
    "cls": "a [CLS] token in the vision tower (CLIP-style towers)",
    "projected": "all tokens through the projector (language-model space)",
    "mlp_projector": "a two-layer MLP projector (linear_1, act, linear_2) for a closed form",
    "text": "the prompt's text embeddings (instruction-conditioned selection)",
    "llm_attention": "the last token's attention at decoder layer K - 1 (recomputed from a hook; SDPA kept)",
    "llm_keys": "post-RoPE keys of decoder layer K - 1",
    "llm_hidden": "the input of decoder layer K after the final norm",
}
"""What a method can declare it needs, and what that means for the model."""


@dataclass
class SelectionContext:
    """Everything a method may read to choose ``k`` tokens per image; fields a method did not declare are None.

    Attributes:
        enc: Vision features ``(images, N, d_v)`` (and one layer's queries/keys if ``attention`` is needed).
        k: Tokens to keep per image.
        projector: The multimodal projector.
        projected: ``(images, N, d_l)`` all tokens projected (``projected`` methods), else None.
        text: ``(images, L, d_l)`` input embeddings of the prompt row each image belongs to, and ``text_mask``
            ``(images, L)`` True at its text tokens (not padding, not image placeholders); ``text`` methods only.
        seed: The pruner's seed; its generator (``generator()``) starts from it and advances over calls.
        options: Method options given to the pruner (``num_directions``, ``grid``, ...).
        cache: Per-pruner storage that survives calls (e.g. a kernel that depends only on the weights).
    """

    enc: VisionEncoding
    k: int
    projector: nn.Module
    projected: torch.Tensor | None = None
    text: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    seed: int = 0
    options: Mapping[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)

    def generator(self) -> torch.Generator:
        """The pruner's generator on the features' device: seeded with its seed on first use, then advancing.

        Kept in ``cache`` (which lives as long as the pruner), so every call draws new random scores or directions:
        training with ``pruning.method: random`` sees a different subset at every step (a generator re-seeded per
        call kept the same tokens all run long), and a rerun with the same seed and inputs repeats exactly.
        """
        device = self.enc.features.device
        key = f"generator:{device}:{self.seed}"
        if key not in self.cache:
            self.cache[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self.cache[key]

    def seeded_generator(self) -> torch.Generator:
        """A fresh generator seeded with the pruner's seed: the same draws on every call.

        For randomness that is part of an estimator rather than of the choice (ZOO-Prune's probe directions): the
        selection is then a function of the image alone, so a batch selects what its images would one by one.
        """
        return torch.Generator(device=self.enc.features.device).manual_seed(self.seed)


@dataclass
class Selection:
    """What a method returns when it does more than pick tokens (a plain ``(images, k)`` index tensor is enough
    otherwise).

    Attributes:
        indices: ``(images, k)`` sorted: the placeholder positions the ``k`` output tokens take (their RoPE
            positions under ``position_policy="original"``).
        weights: Optional ``(images, k, N)``: output token ``j`` is ``weights[:, j] @ features`` (pre-projector),
            e.g. an average of merged tokens (VisionZip). Applied with gradients in training, so merging stays
            differentiable while the choice of what to merge does not.
    """

    indices: torch.Tensor
    weights: torch.Tensor | None = None


def as_selection(result: torch.Tensor | Selection) -> Selection:
    """A method's return value as a :class:`Selection`."""
    return result if isinstance(result, Selection) else Selection(indices=result)


@dataclass(frozen=True)
class PruningMethod:
    """One registered method.

    Attributes:
        name: The name users pass (``VisualTokenPruner(name, keep)``).
        select: ``select(ctx)`` -> ``(images, k)`` sorted kept indices, or a :class:`Selection`.
        needs: Keys of :data:`NEEDS`.
        flops: ``flops(k, vision, options) -> float``: FLOPs spent choosing ``k`` tokens beyond the unpruned
            pipeline (projecting every token is part of that pipeline and not counted).
        paper: Citation (arXiv id or URL).
        summary: One line for the docs table.
        options: Option names the method reads from ``ctx.options``.
        stage: ``"vision"``: tokens are chosen before the language model (``select`` gets a
            :class:`SelectionContext`); ``"llm"``: after decoder layer ``K`` (option ``layer``, default
            ``default_layer``; ``select`` gets an ``in_llm.LLMSelectionContext`` and returns ``(B, I, k)`` positions).
        default_layer: ``K`` of an ``"llm"`` method.
        then: An ``"llm"`` method that prunes again after decoder layer ``K`` when the ``stage2_keep`` option is
            given (a two-stage method such as VScan: ``keep`` tokens enter the LLM, ``stage2_keep`` of them go on
            from layer ``K``, option ``layer``, default half the decoder's depth).
    """

    name: str
    select: Callable[[SelectionContext], torch.Tensor | Selection]
    needs: frozenset[str]
    flops: Callable[[int, VisionShape, Mapping[str, Any]], float]
    paper: str
    summary: str
    options: tuple[str, ...] = ()
    stage: str = "vision"
    default_layer: int = 2
    then: str | None = None

    def __post_init__(self) -> None:
        unknown = set(self.needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"method {self.name!r}: unknown needs {sorted(unknown)}; known: {sorted(NEEDS)}")
        if self.stage not in ("vision", "llm"):
            raise ValueError(f"method {self.name!r}: stage must be 'vision' or 'llm', got {self.stage!r}")


_METHODS: dict[str, PruningMethod] = {}
_loaded = False


def register(method: PruningMethod) -> PruningMethod:
    """Add ``method`` (a name registered twice is an error, so two modules cannot silently shadow each other)."""
    if method.name in _METHODS and _METHODS[method.name] is not method:
        raise ValueError(f"pruning method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(f"owlore.pruning.{module}")


def method_names() -> tuple[str, ...]:
    """Registered method names, sorted (registration order depends on which module was imported first)."""
    _load_builtins()
    return tuple(sorted(_METHODS))


def get_method(name: str) -> PruningMethod:
    """The registered method ``name``.

    Raises:
        ValueError: Naming the known methods and the closest match.
    """
    _load_builtins()
    if name not in _METHODS:
        close = difflib.get_close_matches(str(name), list(_METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown pruning method {name!r}{hint}; choose one of {', '.join(method_names())}")
    return _METHODS[name]


