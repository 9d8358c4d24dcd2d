"""Prompt templates that wrap an instruction before tokenisation."""

from __future__ import annotations

# The Alpaca template is the one the Panacea authors used for every task.
TEMPLATES: dict[str, str] = {
    "alpaca": (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    ),
    "plain": "{instruction}\n",
}

PLACEHOLDER = "{instruction}"


def render_prompt(template: str, instruction: str) -> str:
    """`template` (a TEMPLATES name or a custom string holding "{instruction}") filled with `instruction`.

    str.replace rather than str.format: instructions are user text and may hold
    braces ("{x}" in code questions) that .format would reject or interpret.
    """
    text = TEMPLATES.get(template, template)
    if PLACEHOLDER not in text:
        raise ValueError(
            f"prompt template {template!r} is neither one of {sorted(TEMPLATES)} nor a string containing "
            f"{PLACEHOLDER!r}"
        )
    return text.replace(PLACEHOLDER, instruction)
