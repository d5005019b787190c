"""Model inputs for any supported VLM from its own HF processor: prompts, batches, answer continuations.

The processor knows each family's image preprocessing and how many placeholders an image expands into (LLaVA's
576, LLaVA-NeXT's per-resolution count with ``image_sizes``, Qwen2-VL's ``image_grid_thw``), so the accuracy
evaluation needs no per-family code: it renders the question with the processor's chat template (or a template
the user gives), lets the processor build ids, mask and pixels, and appends scored answer tokens itself, encoded
apart from the prompt, as lm-eval encodes context and continuation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from owlore.errors import UsageError

logger = logging.getLogger(__name__)

__all__ = ["Prompter", "load_processor", "move_inputs"]


def load_processor(model_dir: str | Path, model: Any = None) -> Any:
    """The processor saved with the model; a LLaVA built by ``train.py`` before processors were saved gets
    ``owlore.vision.llava.llava_processor`` (its preprocessing and prompt, rebuilt from the config and tokenizer).

    Raises:
        UsageError: When the directory has no processor and is not such a LLaVA.
    """
    from transformers import AutoProcessor, AutoTokenizer

    path = Path(model_dir)
    local = path.is_dir()
    if not local or any((path / f).is_file() for f in ("processor_config.json", "preprocessor_config.json")):
        return AutoProcessor.from_pretrained(str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    config = getattr(model, "config", None)
    if config is not None and config.model_type == "llava" and "<image>" in tokenizer.get_vocab():
        from owlore.vision.llava import llava_processor

        logger.info("%s has no processor files: using the owlore LLaVA processor (train.py's preprocessing and "
                    "'Question: ... Answer:' prompt)", model_dir)
        return llava_processor(config, tokenizer)
    raise UsageError(f"--model {model_dir}: no processor (processor_config.json / preprocessor_config.json); save "
                     "the model's processor next to it (processor.save_pretrained(DIR))")


def move_inputs(inputs: dict[str, Any], model: Any) -> dict[str, Any]:
    """Tensors on the model's device; floating pixels in the model's dtype."""
    first = next(model.parameters())
    out = {}
    for key, value in inputs.items():
        if not isinstance(value, torch.Tensor):
            out[key] = value
        elif value.is_floating_point():
            out[key] = value.to(device=first.device, dtype=first.dtype)
        else:
            out[key] = value.to(first.device)
    return out


class Prompter:
    """Renders questions for one processor and builds batches, optionally with answer tokens appended.

    Args:
        processor: The model's HF processor.
        template: A prompt with ``{question}`` and the processor's image token (e.g. ``"<image>\\nQ: {question}
            A:"``); None uses the processor's chat template (one user turn: the image, then the question).
    """

    def __init__(self, processor: Any, template: str | None = None) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.image_token = getattr(processor, "image_token", "<image>")
        if template is not None and ("{question}" not in template or self.image_token not in template):
            raise UsageError(f"--prompt {template!r}: give a template with {{question}} and the image token "
                             f"{self.image_token!r}")
        if template is None and not getattr(processor, "chat_template", None):
            raise UsageError("the processor has no chat template: pass --prompt with {question} and "
                             f"{self.image_token!r}")
        self.template = template

    def prompt(self, question: str) -> str:
        if self.template is not None:
            return self.template.replace("{question}", question)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def answer_ids(self, prompt: str, answer: str) -> list[int]:
        """Tokens of ``answer`` after ``prompt``: a space first unless the prompt ends in white space."""
        delimiter = "" if not prompt or prompt[-1].isspace() else " "
        return self.tokenizer(delimiter + answer, add_special_tokens=False)["input_ids"]

    def batch(self, prompts: Sequence[str], images: Sequence[Any], *, answers: Sequence[list[int]] | None = None,
              padding_side: str = "right") -> dict[str, Any]:
        """Processor outputs for the rows; ``answers`` (token lists) are appended after each row's prompt.

        The processor adds the special tokens its model expects (the template has them already, so the text is
        tokenised without adding more). Rows are re-padded on ``padding_side``.
        """
        tok = self.tokenizer
        side, tok.padding_side = tok.padding_side, padding_side
        try:
            enc = dict(self.processor(text=list(prompts), images=list(images), return_tensors="pt", padding=True,
                                      add_special_tokens=self.template is not None))
        finally:
            tok.padding_side = side
        if answers is None:
            return enc
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        mask = enc["attention_mask"].bool()
        per_token = [k for k, v in enc.items() if k not in ("input_ids", "attention_mask")
                     and isinstance(v, torch.Tensor) and v.shape == enc["input_ids"].shape]  # e.g. mm_token_type_ids
        width = max(int(m.sum()) + len(a) for m, a in zip(mask, answers, strict=True))
        for key, fill in [("input_ids", pad), ("attention_mask", 0)] + [(k, 0) for k in per_token]:
            out = torch.full((len(answers), width), fill, dtype=enc[key].dtype)
            for i, (m, a) in enumerate(zip(mask, answers)):
                tail = torch.tensor(a, dtype=out.dtype) if key == "input_ids" else torch.full(
                    (len(a),), 1 if key == "attention_mask" else 0, dtype=out.dtype)  # answers are text tokens
                row = torch.cat([enc[key][i][m], tail])
                span = slice(0, len(row)) if padding_side == "right" else slice(width - len(row), width)
                out[i, span] = row
            enc[key] = out
        return enc


def load_vlm(model: str, *, dtype: Any = None, device: str = "cpu", trust_remote_code: bool = False
             ) -> tuple[Any, Any]:
    """A VLM the pruner supports (HF hub id or ``save_pretrained`` dir) in eval mode, and its processor.

    The config is read first, so a model no adapter supports fails before its weights load.

    Raises:
        UsageError: For a model family the pruner does not support, naming the supported ones.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    from owlore.pruning.models import all_adapters
    from owlore.run.sources import check_model_source

    source = check_model_source(str(model), key="--model")
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    classes = {c for a in all_adapters() for c in a.model_classes}
    arch = (getattr(config, "architectures", None) or [""])[0]
    supported = {"llava", "llava_next", "qwen2_vl"}
    if config.model_type not in supported and arch not in classes:
        raise UsageError(f"--model {model}: a {config.model_type!r} model; visual-token pruning supports "
                         f"{', '.join(sorted(c for c in classes if c.endswith('ForConditionalGeneration')))}")
    vlm = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype or "auto",
                                                      trust_remote_code=trust_remote_code).to(device).eval()
    return vlm, load_processor(source, vlm)


def image_tokens(processor: Any, record: Any, prompt: str | None = None) -> int:
    """Placeholders the processor gives ``record``'s image (LLaVA-1.5: the same for every image)."""
    from owlore.data.vqa_files import load_image

    prompter = Prompter(processor, prompt)
    enc = prompter.batch([prompter.prompt(record.question)], [load_image(record.image)])
    image_id = prompter.tokenizer.convert_tokens_to_ids(prompter.image_token)
    return int((enc["input_ids"] == image_id).sum())
