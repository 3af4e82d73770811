"""How an expert's conversation is presented to the model, shared by training and scoring.

Serving prepends the expert's ``system_prompt`` (from experts.yaml) as a system message when
the request has none, then applies the model's chat template with the generation prompt.
Training must see exactly those tokens, followed by the answer and the end-of-turn token, with
the loss on the answer only. ``encode_example`` tokenizes the whole conversation once and
checks that the prompt's tokens are a prefix of it, so the answer boundary is exact.

This module knows nothing about the tasks' content or about LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass


def chat_messages(system_prompt: str | None, row: dict) -> list[dict]:
    """The messages serving would build for ``row``: the system prompt (if any) then the row's turns."""
    messages = [dict(m) for m in row["messages"]]
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _ids(encoded) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True).
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def prompt_ids(tokenizer, system_prompt: str | None, row: dict) -> list[int]:
    """Token ids of the prompt with the generation prompt, as serving tokenizes it."""
    return _ids(tokenizer.apply_chat_template(chat_messages(system_prompt, row), add_generation_prompt=True))


@dataclass(frozen=True)
class Encoded:
    """One training example: ``ids[label_start:label_end]`` is the answer plus end-of-turn."""

    ids: tuple[int, ...]
    label_start: int
    label_end: int


def encode_example(tokenizer, system_prompt: str | None, row: dict, answer: str | None = None) -> Encoded:
    """Tokenize prompt + answer for training.

    Args:
        tokenizer: the base model's tokenizer (with its chat template).
        system_prompt: the expert's system prompt, or None.
        row: a task row (``messages`` holds the user turn).
        answer: the assistant text (default: ``row["reference"]``).

    Returns:
        The ids with the answer span; the span ends just after the end-of-turn token, so the
        model learns to stop, and excludes anything the template adds after it.
    """
    prompt = prompt_ids(tokenizer, system_prompt, row)
    messages = chat_messages(system_prompt, row) + [{"role": "assistant", "content": answer or row["reference"]}]
    full = _ids(tokenizer.apply_chat_template(messages))
    if full[: len(prompt)] != prompt:
        raise ValueError("the chat template does not render the prompt as a prefix of the conversation; "
                         "this base model's template cannot be trained with answer-only loss here")
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else tokenizer.eos_token_id
    label_end = len(full)
    for i in range(len(prompt), len(full)):
        if full[i] == end_of_turn:
            label_end = i + 1
            break
    return Encoded(tuple(full[:label_end]), len(prompt), label_end)
