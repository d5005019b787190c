"""Turn one instruction example into the prompt string a model sees, identically for training and evaluation.

Instruction data (alpaca / commonsense-170k style: ``instruction``, optional ``input``, ``output``) is rendered with
the tokenizer's chat template when it has one (instruct models such as SmolLM2 were tuned on it), else with the
alpaca template. The answer is appended after the prompt, so the loss mask is "everything before the answer".
"""

from __future__ import annotations

from typing import Any

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def user_message(example: dict[str, Any]) -> str:
    """The user turn of an instruction example: instruction, then the input (if any) on a new paragraph."""
    instruction = str(example["instruction"]).strip()
    extra = str(example.get("input") or "").strip()
    return f"{instruction}\n\n{extra}" if extra else instruction


def build_prompt(tokenizer: Any, example: dict[str, Any], *, use_chat_template: bool | None = None) -> str:
    """Prompt text (without the answer) for an ``instruction``/``input`` example.

    Args:
        tokenizer: a HF tokenizer; its ``chat_template`` is used when present.
        example: a dict with ``instruction`` and optionally ``input`` and ``system`` (a system prompt; without
            it the chat template's default applies, e.g. SmolLM2's long "You are a helpful AI assistant ...").
        use_chat_template: force (True) or forbid (False) the chat template; default: use it if available.
    """
    if use_chat_template is None:
        use_chat_template = bool(getattr(tokenizer, "chat_template", None))
    if use_chat_template:
        messages = [{"role": "user", "content": user_message(example)}]
        if example.get("system"):
            messages.insert(0, {"role": "system", "content": str(example["system"])})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    template = ALPACA_WITH_INPUT if str(example.get("input") or "").strip() else ALPACA_NO_INPUT
    return template.format(instruction=str(example["instruction"]).strip(), input=str(example.get("input", "")))
