"""A small LLaVA-style model around a real language model: a CLIP-style vision tower trained from scratch, the
LLaVA projector, and the language model's own weights, as a stock ``LlavaForConditionalGeneration``.

LLaVA (Liu et al. 2023, arXiv 2304.08485): image patches -> vision transformer -> MLP projector -> visual tokens
placed at the ``<image>`` placeholders of the prompt. No pretrained vision weights can be downloaded on our machines,
so the tower starts from random weights and learns on real images (``owlore.data.fashion_vqa``). Because the result
is a stock transformers model, ``VisualTokenPruner``, ``generate``, ``save_pretrained`` and ``from_pretrained`` work
on it unchanged.

Default layout, for the 84×84 Fashion-MNIST grids: patch 7 gives 12×12 = 144 visual tokens, and each 28-pixel grid
cell is exactly 4×4 patches. So a budget of 1/9 (16 tokens) is one cell's worth, and a position question needs about
that much.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from owlore.run.config import VisionTowerConfig

__all__ = ["IMAGE_TOKEN", "PROMPT_TEMPLATE", "VisionTowerConfig", "build_llava", "collate", "encode_example",
           "llava_processor", "pixel_values", "prompt_ids", "vqa_features"]

IMAGE_TOKEN = "<image>"
PROMPT_TEMPLATE = ("{% if bos_token %}{{ bos_token }}{% endif %}{% for m in messages %}{% for c in m['content'] %}"
                   "{% if c['type'] == 'image' %}{{ '<image>' }}{% elif c['type'] == 'text' %}"
                   "{{ '\\nQuestion: ' + c['text'] }}{% endif %}{% endfor %}{% endfor %}{{ '\\nAnswer:' }}")
"""The chat template of :func:`llava_processor`: renders one user turn exactly as :func:`prompt_ids` builds it."""


def build_llava(language_model: nn.Module, tokenizer: Any, vision: VisionTowerConfig | None = None, *,
                seed: int = 0) -> tuple[nn.Module, Any]:
    """``LlavaForConditionalGeneration`` with ``language_model``'s weights and a random vision tower + projector.

    The tokenizer gets an ``<image>`` token (the embedding matrix grows by one row if the vocabulary has no spare
    rows). Returns the model (fp32, train mode) and the tokenizer.
    """
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = vision or VisionTowerConfig()
    if vision.image_size % vision.patch_size:
        raise ValueError(f"image_size {vision.image_size} is not a multiple of patch_size {vision.patch_size}")
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text_config = language_model.config
    vocab = max(text_config.vocab_size, len(tokenizer))
    vcfg = CLIPVisionConfig(hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
                            num_hidden_layers=vision.num_layers, num_attention_heads=vision.num_heads,
                            image_size=vision.image_size, patch_size=vision.patch_size, num_channels=3)
    config = LlavaConfig(vision_config=vcfg, text_config=text_config.to_dict(), image_token_id=image_id,
                         vision_feature_layer=vision.feature_layer, vision_feature_select_strategy="default",
                         tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)))
    config.text_config.vocab_size = vocab
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    language_model.resize_token_embeddings(vocab)
    model.model.language_model.load_state_dict(language_model.model.state_dict())
    model.lm_head.load_state_dict(language_model.lm_head.state_dict())
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.float().train(), tokenizer


def pixel_values(images: np.ndarray | Sequence[np.ndarray], tower: nn.Module | None = None) -> torch.Tensor:
    """``[B, 3, H, W]`` float pixels in [-1, 1] from grayscale uint8 images (the gray channel repeated); with
    ``tower`` (a vision tower) on its device and in its dtype."""
    x = torch.as_tensor(np.stack(list(images)) if not isinstance(images, np.ndarray) else images)
    x = x.float().div(127.5).sub(1.0)
    x = x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    if tower is None:
        return x
    first = next(tower.parameters())
    return x.to(device=first.device, dtype=first.dtype)


def llava_processor(config: Any, tokenizer: Any) -> Any:
    """A ``LlavaProcessor`` that prepares images and prompts exactly as training did (:func:`pixel_values`,
    :func:`prompt_ids`): gray or RGB images resized to the tower's size and scaled to [-1, 1], and a chat template
    giving ``<image>`` × N, ``\\nQuestion: ...\\nAnswer:``. ``train.py`` saves it with the model, so any VLM tool
    that reads a processor (``eval/vlm_pruning.py``, lmms-eval) runs the model as it was trained."""
    import transformers
    from transformers import LlavaProcessor

    v = config.vision_config
    images = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor  # exact: PIL
    image_processor = images(size={"shortest_edge": v.image_size},
                             crop_size={"height": v.image_size, "width": v.image_size},
                             image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=v.patch_size,
                          vision_feature_select_strategy=config.vision_feature_select_strategy,
                          num_additional_image_tokens=1, image_token=IMAGE_TOKEN, chat_template=PROMPT_TEMPLATE)


def prompt_ids(tokenizer: Any, question: str, num_image_tokens: int) -> list[int]:
    """``<image>`` × N, then the question and ``Answer:`` (the answer follows as a short word)."""
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + [image_id] * num_image_tokens + _question_ids(tokenizer, question)


def _question_ids(tokenizer: Any, question: str) -> list[int]:
    """One turn's ``\nQuestion: ...\nAnswer:`` (the prompt's and every follow-up's)."""
    return tokenizer(f"\nQuestion: {question}\nAnswer:", add_special_tokens=False)["input_ids"]


def encode_example(tokenizer: Any, example: Any, num_image_tokens: int) -> dict[str, Any]:
    """Training features of one ``VQAExample``: labels only on the answers and the end-of-sequence token.

    Follow-up questions continue the conversation after the first answer (``\nQuestion: ...\nAnswer: ...``), so
    the first turn is exactly the evaluation prompt and its answer.
    """
    ids = prompt_ids(tokenizer, example.question, num_image_tokens)
    labels = [-100] * len(ids)
    turns = [(example.question, example.answer), *((q, a) for q, a, _ in example.follow_ups)]
    for i, (question, answer) in enumerate(turns):
        if i:
            text = _question_ids(tokenizer, question)
            ids, labels = ids + text, labels + [-100] * len(text)
        target = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
        ids, labels = ids + target, labels + target
    if tokenizer.eos_token_id is not None:
        ids, labels = ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
    return {"input_ids": ids, "labels": labels, "image": example.image}


def collate(features: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels`` and ``pixel_values``."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), -100, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "pixel_values": pixel_values([f["image"] for f in features])}


def vqa_features(tokenizer: Any, vision: Any, *, split: str = "train", n: int | None = None) -> list[dict[str, Any]]:
    """Encoded Fashion-MNIST grid questions of ``split`` (``vision``: a ``VisionConfig``; train: the official
    training images, ``vision.questions_per_image`` questions each; test: the held-out ones, one question each),
    ``n`` images (default ``vision.train_examples``), deterministic in ``vision.seed``."""
    from owlore.data.fashion_vqa import HELDOUT_SEED_OFFSET, build_vqa, load_fashion_mnist

    images, labels = load_fashion_mnist(split, vision.data_dir)
    seed = vision.seed if split == "train" else vision.seed + HELDOUT_SEED_OFFSET
    questions = vision.questions_per_image if split == "train" else 1  # held out: one question per image
    examples = build_vqa(images, labels, n or vision.train_examples, grid=vision.grid, seed=seed, questions=questions)
    return [encode_example(tokenizer, e, vision.num_tokens) for e in examples]
