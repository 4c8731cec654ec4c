"""Chat templates: how a conversation becomes the one string an instruction-tuned model was trained on.

A chat model reads a conversation as plain text in which special tokens mark the turns. SmolLM2, Qwen and
many others use **ChatML**::

    <|im_start|>system
    You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
    <|im_start|>user
    What is the capital of France?<|im_end|>
    <|im_start|>assistant

and the model continues after the last line until it writes ``<|im_end|>``. ``transformers`` stores the
template as a Jinja program in the tokenizer (``apply_chat_template``); :func:`chatml_prompt` is the same
rule written out in Python.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mmbook.checks import check_bool

__all__ = ["IM_END", "IM_START", "SMOLLM2_SYSTEM", "chatml_prompt"]

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
_ROLES = ("system", "user", "assistant")


def chatml_prompt(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True,
                  default_system: str | None = SMOLLM2_SYSTEM) -> str:
    """The ChatML text of ``messages`` (``[{"role": ..., "content": ...}, ...]``).

    Each message becomes ``<|im_start|>{role}\\n{content}<|im_end|>\\n``. When the first message is not a
    system message and ``default_system`` is not None, a system message with that text comes first (SmolLM2's
    template does this). ``add_generation_prompt`` appends ``<|im_start|>assistant\\n``, where the model's
    answer begins. The defaults are those of asking SmolLM2 a question, as its own template does;
    :func:`mmbook.sft.chat_segments` and :func:`mmbook.sft.tokenize_chat`, which write training data, default to
    no generation prompt and no implicit system message.
    """
    fn = "chatml_prompt"
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise TypeError(f"{fn}: messages must be a non-empty list of {{'role', 'content'}} dicts, "
                        f"got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or set(m) != {"role", "content"}:
            raise ValueError(f"{fn}: messages[{i}] must be a dict with exactly the keys 'role' and 'content', "
                             f"got {m!r}")
        if m["role"] not in _ROLES or not isinstance(m["content"], str):
            raise ValueError(f"{fn}: messages[{i}] needs a role in {_ROLES} and a str content, got {m!r}")
    check_bool("add_generation_prompt", add_generation_prompt, fn)
    if default_system is not None and not isinstance(default_system, str):
        raise TypeError(f"{fn}: default_system must be a str or None, got {type(default_system).__name__}")
    text = ""
    if messages[0]["role"] != "system" and default_system is not None:
        text += f"{IM_START}system\n{default_system}{IM_END}\n"
    for m in messages:
        text += f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n"
    if add_generation_prompt:
        text += f"{IM_START}assistant\n"
    return text
