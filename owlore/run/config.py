"""``OwLoreConfig``: every knob of OwLore in one validated dataclass.

Defaults follow the official scripts of OwLore (arXiv 2405.18380, pixeli99/OwLore ``run_owlore_low_rank.sh``):
γ=5 layers, re-sampled every K=50 optimizer steps, GaLore rank 256 (the paper text reports 128), gap 100, scale 1.0.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owlore.errors import UsageError
from owlore.layerwise.sampler import MODES, SCHEMES
from owlore.run.typecheck import coerce, suggest

STATE_POLICIES = ("reset", "keep", "offload")
PROJ_TYPES = ("std", "reverse_std", "left", "right")


class ConfigError(UsageError):
    """Invalid configuration; the message lists every problem, one per line, each with its key and a fix."""

    kind = "config error"


@dataclass
class OwLoreConfig:
    """OwLore hyper-parameters (layer sampling + GaLore projection + what else trains)."""

    gamma: int = 5
    """Decoder layers trained at once (γ)."""
    interval: int = 50
    """Optimizer steps between re-samples (K); gradient accumulation counts optimizer steps."""
    mode: str = "owl"
    """Sampling mode: owl (outlier-weighted), uniform (LISA), owl_reverse, increase, decrease."""
    scheme: str = "exact"
    """Draw: exact (inclusion probabilities realised exactly) or sequential (official numpy.random.choice)."""
    temperature: float = 1.0
    """owl mode: p ∝ ratio^(1/temperature)."""
    floor: float = 0.0
    """Share of uniform probability mixed in, so no layer starves."""
    rank: int | None = 256
    """GaLore rank for the linears of decoder layers; None trains them full-rank ("OwLore (Full-Rank)")."""
    update_proj_gap: int = 100
    """Parameter steps between SVD refreshes of the GaLore basis."""
    scale: float = 1.0
    """GaLore scale α applied to the back-projected update."""
    proj_type: str = "std"
    """GaLore side: std, reverse_std, left, right."""
    basis_method: str = "svd"
    """GaLore basis refresh: svd (full SVD, as GaLore) or randomized (range finder warm-started from the previous
    basis: a fraction of the SVD's time, see benchmarks/optimizer_step.py)."""
    power_iters: int = 2
    """Subspace iterations of the randomized range finder."""
    convention: str = "torch"
    """Adam eps / weight-decay order: torch (torch.optim.AdamW) or hf (galore-torch, the official OwLore code)."""
    target_modules: str | list[str] = "decoder-linear"
    """Which linears are projected: decoder-linear, all-linear, or a list of regexes on module names."""
    threshold: float = 5.0
    """Outlier threshold M: a weight is an outlier if its Wanda score exceeds M × the layer mean."""
    state_policy: str = "reset"
    """Optimizer state of a switched-off layer: reset (free it; basis recomputed on return), keep (official),
    offload (to CPU and back)."""
    seed: int = 0
    """Seed of the layer sampler's own generator."""
    train_embeddings: bool = True
    """Train the input embeddings (paper: yes)."""
    train_lm_head: bool = True
    """Train the output head (paper: yes). A tied head is the embedding matrix: it trains if either flag is on."""
    train_norms: bool = True
    """Train norms outside decoder layers, e.g. the final norm (paper: yes)."""
    train_vision: bool = False
    """LLaVA models: also train the vision tower and projector (one trained from scratch); default frozen."""
    layers_path: str | None = None
    """Explicit attribute path of the decoder layers (e.g. model.layers) when auto-discovery fails."""
    calibration_batches: int = 8
    """Training batches used to compute outlier ratios when no scores/cache/calibration source is given."""
    calibration_source: str | None = None
    """Calibration text instead of training batches: c4, a datasets name or a local file."""
    calibration_samples: int = 128
    """Windows of calibration_source text (paper: 128)."""
    calibration_seqlen: int = 2048
    """Tokens per calibration window (paper: 2048)."""
    cache_dir: str | None = None
    """Where outlier ratios are cached as JSON (None: no cache)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes recorded with the run (not used by the algorithm)."""

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError("invalid OwLoreConfig:\n" + "\n".join(f"  - {p}" for p in problems))

    def problems(self, prefix: str = "") -> list[str]:
        """Every invalid field, as ``key=value: why; fix`` lines."""
        out = []

        def bad(key: str, why: str) -> None:
            out.append(f"{prefix}{key}={getattr(self, key)!r}: {why}")

        if not isinstance(self.gamma, int) or self.gamma < 1:
            bad("gamma", "must be an integer >= 1 (layers trained at once; paper: 5)")
        if not isinstance(self.interval, int) or self.interval < 1:
            bad("interval", "must be an integer >= 1 (optimizer steps between re-samples; paper: 50)")
        if self.mode not in MODES:
            bad("mode", f"must be one of {', '.join(MODES)}")
        if self.scheme not in SCHEMES:
            bad("scheme", f"must be one of {', '.join(SCHEMES)}")
        if not self.temperature > 0:
            bad("temperature", "must be > 0")
        if not 0 <= self.floor <= 1:
            bad("floor", "must be in [0, 1]")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            bad("rank", "must be a positive integer, or null to train sampled layers full-rank")
        if not isinstance(self.update_proj_gap, int) or self.update_proj_gap < 1:
            bad("update_proj_gap", "must be an integer >= 1")
        if not self.scale > 0:
            bad("scale", "must be > 0")
        if self.convention not in ("torch", "hf"):
            bad("convention", "must be torch or hf")
        if self.basis_method not in ("svd", "randomized"):
            bad("basis_method", "must be svd or randomized")
        if not isinstance(self.power_iters, int) or self.power_iters < 0:
            bad("power_iters", "must be an integer >= 0")
        if self.proj_type not in PROJ_TYPES:
            bad("proj_type", f"must be one of {', '.join(PROJ_TYPES)}")
        if not self.threshold > 0:
            bad("threshold", "must be > 0 (OWL uses 3-13; default 5)")
        if self.state_policy not in STATE_POLICIES:
            bad("state_policy", f"must be one of {', '.join(STATE_POLICIES)}")
        if not isinstance(self.calibration_batches, int) or self.calibration_batches < 1:
            bad("calibration_batches", "must be an integer >= 1")
        if self.calibration_samples < 1 or self.calibration_seqlen < 1:
            out.append(f"{prefix}calibration_samples/calibration_seqlen must be >= 1")
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def dataclass_from_dict(
    cls: type, data: dict[str, Any], *, section: str, raw: dict[str, str] | None = None
) -> tuple[Any | None, list[str]]:
    """Build a config dataclass from a mapping, collecting (not raising) unknown keys and invalid values.

    Values are read against each field's type (``owlore.run.typecheck.coerce``): a string field gets a string, a float
    field accepts ``3e-4``. ``raw`` maps keys to their original override text.

    Returns the instance built from the valid keys (None if even that failed) and the list of problems, each
    naming ``section.key``; the instance is only meaningful when the list is empty.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    problems = [f"{section}.{k}: unknown key{suggest(k, names)}; valid keys: {', '.join(sorted(names))}"
                for k in data if k not in names]
    typed_ok: dict[str, Any] = {}
    for k, v in data.items():
        if k not in names:
            continue
        value, why = coerce(v, hints[k], raw=(raw or {}).get(k))
        if why:
            problems.append(f"{section}.{k}={v!r}: {why}")
        else:
            typed_ok[k] = value
    try:  # also built when some keys are bad, so value problems of the other keys are reported in the same error
        obj = cls(**typed_ok)
    except ConfigError as e:
        problems += [f"{section}.{ln.strip()[2:]}" for ln in str(e).splitlines()[1:]]
        return None, problems
    except (ValueError, TypeError) as e:  # a section defined outside owlore (a plugin method) that raises itself
        problems.append(f"{section}: {e}")
        return None, problems
    if hasattr(obj, "problems") and not isinstance(obj, OwLoreConfig):  # OwLoreConfig checks in __post_init__
        problems += obj.problems(prefix=f"{section}.")
    return obj, problems  # obj (from the valid keys) lets callers run further checks; use it only if no problems


@dataclass
class ModelConfig:
    """Which model to fine-tune and how to load it."""

    name: str = "smollm2-135m-instruct"
    """HF hub id, local checkpoint directory, or the embedded model's name ``smollm2-135m-instruct``."""
    dtype: str = "float32"
    """float32 (CPU/tests), bfloat16 (GPU, paper), float16, or auto."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (non-reentrant) to save memory."""
    attn_implementation: str | None = None
    """sdpa, eager, flash_attention_2 ... (None: transformers' default)."""
    trust_remote_code: bool = False
    """Run code shipped with a hub model. Off unless you set it."""


    def problems(self, prefix: str = "model.") -> list[str]:
        ok = ("float32", "bfloat16", "float16", "auto")
        return [] if self.dtype in ok else [f"{prefix}dtype={self.dtype!r}: must be one of {', '.join(ok)}"]


@dataclass
class DataConfig:
    """Fine-tuning data."""

    train: str = "demo"
    """demo (synthetic demo tasks), a datasets hub name, or a local .json/.jsonl file."""
    split: str = "train"
    max_seq_length: int = 512
    packing: bool = False
    """Concatenate examples into blocks of max_seq_length (official scripts' grouped texts)."""
    limit: int | None = None
    """Use only the first N rows."""
    skip_bad_rows: bool = False
    """Skip (and count) unusable rows instead of stopping at the first one."""

    def problems(self, prefix: str = "data.") -> list[str]:
        out = []
        if self.max_seq_length < 8:
            out.append(f"{prefix}max_seq_length={self.max_seq_length}: must be >= 8")
        if self.limit is not None and self.limit < 1:
            out.append(f"{prefix}limit={self.limit}: must be >= 1 or null")
        return out


@dataclass
class MemoryConfig:
    """Memory-saving options of every method (``owlore/memory/``); each is off by default and changes no result
    where it should not (tests compare against the plain run). Each option is declared once, beside its
    implementation, as a ``MemoryOption`` (what it takes, excludes, does and how the estimator counts it); the
    fields here are the shipped options' typed values."""

    chunked_loss: int = 0
    """Tokens per chunk of the output head + cross-entropy (``owlore.memory.chunked_loss``): the full logits and
    their gradient are never materialised. 0: the model's own loss (default). 1024-4096 is a good chunk."""
    checkpointing: str = "off"
    """Activation checkpointing: off (``model.gradient_checkpointing`` decides, which means all), all (every
    decoder layer), frozen (layer-switching methods: only the layers not trained now; the γ active layers keep
    their activations, so the recompute is the frozen layers' forward only)."""
    frozen_weights: str = "full"
    """Layer-switching methods: full, or int8 (frozen decoder layers as int8 + per-row scales on the device, exact
    weights on the host, swapped back when a layer is sampled; ``owlore.memory.int8_frozen``)."""
    sparse_embedding_grad: bool = False
    """Methods with their own optimizer: the input embedding's gradient as the row-sparse tensor it is (rows of the
    batch's tokens only; ``nn.Embedding(sparse=True)``), made dense only when it steps. A tied head's dense
    gradient then takes the embedding's rows in place instead of a second vocabulary-sized buffer."""
    offload_activations: bool = False
    """With activation checkpointing: the checkpointed layer inputs (and the head's input) in host memory, pinned
    on CUDA, copied back when backward needs them (``owlore.memory.offload_activations``). Saves L·batch·seq·d
    activation bytes on the device for one copy each way per layer."""
    profile: bool = False
    """Record live tensor bytes by kind (weights, gradients, optimizer state, saved activations) at the peak of
    each step into ``owlore_record.json`` (``owlore.memory.probe``; costs a little time; ``eval/bench.py`` sets
    it)."""

    plugins: dict[str, Any] = field(default_factory=dict)
    """Values of options registered from outside owlore (``owlore.memory.options.register``), filled by the
    config loader from ``memory.<name>`` keys; set them by their names, not here."""

    def problems(self, prefix: str = "memory.") -> list[str]:
        """Every option's value check, from its declaration (``owlore.memory.options``)."""
        from owlore.memory.options import value_problems

        return value_problems(self, prefix)


@dataclass
class VisionTowerConfig:
    """The from-scratch vision tower of ``owlore.vision.llava.build_llava`` (a ``CLIPVisionConfig``) and how LLaVA reads it."""

    image_size: int = 84
    """Pixels per side of the grid image (grid × 28)."""
    patch_size: int = 7
    """84 / 7 = 12 × 12 = 144 visual tokens; each grid cell is 4 × 4 patches."""
    hidden_size: int = 192
    intermediate_size: int = 768
    num_layers: int = 4
    num_heads: int = 4
    feature_layer: int = -1
    """The tower layer whose outputs are projected (LLaVA-1.5 uses -2 of a pretrained CLIP; a tower trained with
    the task uses its last)."""

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class VisionConfig(VisionTowerConfig):
    """Train a LLaVA-style model on the Fashion-MNIST grid VQA set (``owlore.vision.llava``, ``owlore.data.fashion_vqa``):
    the loaded language model gets a CLIP-style vision tower (the inherited fields) trained from scratch and the
    LLaVA projector."""

    enabled: bool = False
    grid: int = 3
    """Items per side of each image (2 or 3)."""
    data_dir: str | None = None
    """Directory of the Fashion-MNIST idx files (default: Debian's /usr/share/datasets/fashion-mnist)."""
    train_examples: int = 20000
    """Images (each with its questions) generated from the official training images."""
    questions_per_image: int = 1
    """Training conversations: questions asked about each training image (``owlore.data.fashion_vqa.build_vqa``);
    more than one makes each step supervise several answers for the price of one image."""
    seed: int = 0
    train_tower: bool = True
    """Train the vision tower and projector (they start from random weights, so almost always)."""
    freeze_language_model: bool = False
    """Method full only: train the tower and projector alone (a frozen LM)."""
    align_steps: int = 0
    """Before LLaVA training, align the tower and projector with the LM's class-word embeddings for this many steps
    (``owlore.vision.align``: no LM pass, ~30x cheaper per image); 0 skips it."""
    align_batch_size: int = 32
    align_lr: float = 2e-3
    eval_examples: int = 96
    """Held-out questions scored after training (test-split images, ``owlore.pruning.accuracy``); 0 skips."""

    def problems(self, prefix: str = "vision.") -> list[str]:
        out = []
        if self.enabled and self.image_size % self.patch_size:
            out.append(f"{prefix}patch_size={self.patch_size}: must divide image_size={self.image_size}")
        if self.enabled and self.image_size != self.grid * 28:
            out.append(f"{prefix}image_size={self.image_size}: must be grid × 28 = {self.grid * 28} (Fashion-MNIST "
                       "items are 28 pixels)")
        if self.grid not in (2, 3):
            out.append(f"{prefix}grid={self.grid}: must be 2 or 3")
        if self.train_examples < 1:
            out.append(f"{prefix}train_examples={self.train_examples}: must be >= 1")
        if self.questions_per_image < 1:
            out.append(f"{prefix}questions_per_image={self.questions_per_image}: must be >= 1")
        if self.align_steps < 0:
            out.append(f"{prefix}align_steps={self.align_steps}: must be >= 0 (0 skips the alignment)")
        if self.align_steps and 28 % self.patch_size:
            out.append(f"{prefix}patch_size={self.patch_size}: the alignment needs a patch that divides the 28-pixel "
                       "item (7, 14 or 28)")
        if self.align_batch_size < 1 or self.align_lr <= 0:
            out.append(f"{prefix}align_batch_size={self.align_batch_size}, align_lr={self.align_lr}: must be > 0")
        return out


def pruning_methods() -> tuple[str, ...]:
    """The registered ``owlore.pruning`` methods (imported only when a config names one: reading a config that
    does not prune imports no torch)."""
    from owlore.pruning.registry import method_names

    return method_names()


@dataclass
class PruningConfig:
    """Train a ``vision:`` LLaVA with visual-token pruning on (``owlore.pruning.training``): each training forward
    keeps ``keep`` tokens per image, chosen by ``method``, so the model learns to answer from what the pruner keeps.
    Evaluation chooses its own pruner (``eval/vlm_pruning.py accuracy``)."""

    method: str | None = None
    """One of the ``VisualTokenPruner`` methods; None trains on every token."""
    keep: float = 16
    """Tokens per image (an integer >= 1) or a ratio in (0, 1)."""
    num_directions: int = 16
    """ZOO-Prune's random directions."""
    seed: int = 0

    def problems(self, prefix: str = "pruning.") -> list[str]:
        out = []
        if self.method is not None and self.method not in (known := pruning_methods()):
            out.append(f"{prefix}method={self.method!r}: must be one of {', '.join(known)}{suggest(str(self.method), known)}")
        if not (0 < self.keep < 1 or (self.keep >= 1 and float(self.keep).is_integer())):
            out.append(f"{prefix}keep={self.keep}: must be an integer >= 1 (tokens) or a ratio in (0, 1)")
        if self.num_directions < 1:
            out.append(f"{prefix}num_directions={self.num_directions}: must be >= 1")
        return out


@dataclass
class ParallelConfig:
    """Scale-out beyond data parallelism (``torchrun``/``accelerate launch`` give DDP, ``training.deepspeed`` ZeRO;
    README "Scale out")."""

    fsdp2: bool = False
    """Shard weights, gradients and optimizer state with FSDP2 ``fully_shard``, one unit per decoder layer
    (``owlore.parallel.fsdp``); for full, lisa, owlore and galore. Needs several processes (``torchrun``)."""
    reshard_after_forward: bool = True
    """Free each layer's gathered weights after its forward (ZeRO-3-like); false keeps them until backward."""

    def problems(self, prefix: str = "parallel.") -> list[str]:
        return []


@dataclass
class EvalConfig:
    """Evaluations run before/after training (results go to the JSON record and TensorBoard)."""

    demo: bool = False
    """Held-out accuracy on the synthetic demo tasks, before and after training."""
    demo_limit: int | None = None
    """Evaluate only the first N held-out demo items."""
    suites: list[str] = field(default_factory=list)
    """After training: any of mmlu, commonsense (lm-eval)."""
    data_dir: str | None = None
    """Local JSONL data for the suites (offline); None uses the hub datasets."""
    mmlu_split: str = "test"
    """MMLU split: test (hub) or dev (items shipped in lm-eval, offline)."""
    shots: int | None = None
    """Few-shot examples (default: 5 for MMLU, 0 for commonsense)."""
    limit: int | None = None
    batch_size: int = 8
    before: bool = True
    """Also evaluate the model before training (a benchmark measures the base model once and sets it false)."""
    answers: dict[str, str] = field(default_factory=dict)
    """Free-form answer sets, name -> JSONL of instruction/output rows: greedy answers scored by exact match,
    token F1 and ROUGE-L (``owlore.evaluation.answers``), e.g. ``{validation: ..., test: ...}``."""
    answers_limit: int | None = None
    """Score only the first N rows of each answer set."""
    max_new_tokens: int = 32
    perplexity: dict[str, str] = field(default_factory=dict)
    """Perplexity sets, name -> JSONL of text rows (``owlore.evaluation.perplexity``): held-out domain text, and
    general text of another kind for forgetting."""
    perplexity_seq: int = 128
    """Tokens per perplexity block."""
    perplexity_limit: int | None = 96
    """Blocks scored per perplexity set (None: all)."""

    def problems(self, prefix: str = "eval.") -> list[str]:
        out = []
        bad = [s for s in self.suites if s not in ("mmlu", "commonsense")]
        if bad:
            out.append(f"{prefix}suites={self.suites!r}: unknown {bad}; use mmlu and/or commonsense")
        for key in ("answers", "perplexity"):
            for name, path in getattr(self, key).items():
                if not isinstance(path, str) or not Path(path).is_file():
                    out.append(f"{prefix}{key}.{name}={path!r}: no such file; build the real tasks with "
                               "`make tasks` (scripts/prepare_tasks.py) or give a JSONL path")
        for key in ("answers_limit", "perplexity_limit"):
            v = getattr(self, key)
            if v is not None and v < 1:
                out.append(f"{prefix}{key}={v}: must be >= 1 or null (all rows)")
        if self.max_new_tokens < 1 or self.perplexity_seq < 8:
            out.append(f"{prefix}max_new_tokens={self.max_new_tokens}, perplexity_seq={self.perplexity_seq}: "
                       "need max_new_tokens >= 1 and perplexity_seq >= 8")
        return out
