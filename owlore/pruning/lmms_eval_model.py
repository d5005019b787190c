"""lmms-eval model ``owlore_vlm``: any VLM the pruner supports, run through a ``VisualTokenPruner``.

lmms-eval (https://github.com/EvolvingLMMs-Lab/lmms-eval) is how the field reports VLM pruning (MME, POPE, GQA, ...);
this model lets it call ours. Install the extra (``pip install .[lmms]``), then::

    python -m lmms_eval --model owlore_vlm --force_simple \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,pruning=holov,keep=64,dtype=bfloat16 \\
        --tasks mme,pope,gqa --batch_size 8 --output_path results/

``model_args``: ``pretrained`` (hub id or directory), ``pruning`` (a registered method, or ``none``), ``keep``
(tokens per image, or a ratio in (0, 1]), ``dtype``, ``prompt`` (a template with ``{question}`` and the image
token; default the processor's chat template), ``llm_layer`` (K of the in-LLM methods), ``seed``,
``trust_remote_code``. The model is registered through the ``lmms_eval.models`` entry point
(``owlore.pruning.lmms_manifest``), so lmms-eval needs no edit.

Generation requests are batched and pruned exactly as ``eval/vlm_pruning.py`` prunes them; log-likelihood requests
(multiple choice) return each continuation's summed negative log-likelihood, the loss lmms-eval's ``argmin`` picks.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult
from lmms_eval.api.model import lmms

from owlore.pruning.accuracy import continuation_scores, prepare_inputs
from owlore.pruning.vlm_inputs import Prompter, load_vlm

logger = logging.getLogger(__name__)

__all__ = ["OwloreVLM"]


def _keep(value: Any) -> int | float:
    """``keep=64`` is a token count, ``keep=0.25`` a ratio (lmms-eval already typed the string)."""
    number = float(value)
    return int(number) if number >= 1 and number == int(number) else number


class OwloreVLM(lmms):
    """The lmms-eval "simple" model (prompt text + the doc's images), so both generation and multiple-choice tasks
    run."""

    is_simple = True

    def __init__(self, pretrained: str, pruning: str = "none", keep: Any = 1.0, dtype: str = "auto",
                 prompt: str | None = None, llm_layer: int | None = None, seed: int = 0,
                 trust_remote_code: bool = False, batch_size: int | str = 1, device: str | None = None,
                 max_new_tokens: int = 128, **unused: Any) -> None:
        super().__init__()
        from owlore.evaluation.loading import resolve_device, resolve_dtype
        from owlore.pruning.vqa_benchmark import make_pruner

        if unused:
            raise ValueError(f"owlore_vlm: unknown model_args {sorted(unused)}; known: pretrained, pruning, keep, "
                             "dtype, prompt, llm_layer, seed, trust_remote_code, max_new_tokens")
        self.device_name = resolve_device(device or "auto")
        self.model, self.processor = load_vlm(pretrained, dtype=resolve_dtype(dtype, self.device_name),
                                              device=self.device_name, trust_remote_code=bool(trust_remote_code))
        self.prompter = Prompter(self.processor, prompt)
        self.pruner = None if pruning in (None, "none") else make_pruner(
            pruning, _keep(keep), seed=int(seed), llm_layer=None if llm_layer is None else int(llm_layer))
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        logger.info("owlore_vlm: %s, pruning %s", pretrained, self.pruner or "off")

    def _request_parts(self, args: tuple) -> tuple[str, list[Any], Any]:
        context, extra, doc_to_visual, doc_id, task, split = args
        images = [im.convert("RGB") for im in doc_to_visual(self.task_dict[task][split][doc_id])]
        if len(images) != 1:
            raise ValueError(f"owlore_vlm scores one image per question; {task} doc {doc_id} has {len(images)}")
        return context.replace(self.prompter.image_token, "").strip(), images, extra  # the prompt places the image

    def generate_until(self, requests: list[Any]) -> list[str]:
        tok, out = self.prompter.tokenizer, []
        for start in range(0, len(requests), self.batch_size_per_gpu):
            parts = [self._request_parts(r.args) for r in requests[start:start + self.batch_size_per_gpu]]
            kwargs = dict(parts[0][2])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            batch = self.prompter.batch([self.prompter.prompt(c) for c, _, _ in parts], [i[0] for _, i, _ in parts],
                                        padding_side="left")
            with torch.no_grad():
                inputs = prepare_inputs(self.model, self.pruner, batch)
                ids = self.model.generate(**inputs, do_sample=False,
                                          max_new_tokens=int(kwargs.get("max_new_tokens", self.max_new_tokens)),
                                          pad_token_id=tok.pad_token_id if tok.pad_token_id is not None
                                          else tok.eos_token_id)
            for text in tok.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True):
                for stop in until:
                    text = text.split(stop)[0]
                out.append(text.strip())
        return out

    def loglikelihood(self, requests: list[Any]) -> list[Any]:
        out = []
        for start in range(0, len(requests), self.batch_size_per_gpu):
            parts = [self._request_parts(r.args) for r in requests[start:start + self.batch_size_per_gpu]]
            prompts = [self.prompter.prompt(c) for c, _, _ in parts]
            answers = [self.prompter.tokenizer(cont, add_special_tokens=False)["input_ids"] for _, _, cont in parts]
            batch = self.prompter.batch(prompts, [i[0] for _, i, _ in parts], answers=answers)
            with torch.no_grad():
                scored = continuation_scores(self.model, prepare_inputs(self.model, self.pruner, batch), answers)
            # the loss (lmms-eval picks the argmin), wrapped: 0.7.3 turns a bare (float, bool) tuple into a string
            out += [GenerationResult(text=(-value, greedy)) for value, greedy in scored]
        return out

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("owlore_vlm answers single-turn questions")
