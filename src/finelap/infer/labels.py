"""Label lists and prompts: `--labels` syntax (';' or ',' separated, CSV-style quotes) and the one
rule that turns a label into a text query (`finelap.scoring.make_prompt`)."""
from __future__ import annotations

from typing import Sequence

from ..errors import ConfigError, FinelapError
from ..scoring import make_prompts

__all__ = ["split_labels", "parse_labels", "apply_template"]


def split_labels(text: str) -> list[str]:
    """Split a label string on ';' and ',' outside double quotes, CSV style: `dog;rain, heavy`
    -> ["dog", "rain", "heavy"]; `dog;"rain, heavy"` -> ["dog", "rain, heavy"]; `""` inside
    quotes is a literal quote. Items are stripped; empty items are kept (the caller decides).

    Raises FinelapError for an unclosed quote."""
    items: list[str] = []
    cur: list[str] = []
    quoted = False
    i = 0
    while i < len(text):
        c = text[i]
        if c == '"':
            if quoted and text[i + 1 : i + 2] == '"':  # "" inside quotes: a literal quote
                cur.append('"')
                i += 1
            else:
                quoted = not quoted
        elif c in ";," and not quoted:
            items.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
        i += 1
    if quoted:
        raise FinelapError(f"unclosed double quote in the label list {text!r}")
    items.append("".join(cur).strip())
    return items


def parse_labels(labels: str | Sequence[str]) -> list[str]:
    """Labels from a list (used as given, stripped) or a string in `--labels` syntax: separated
    by ';' or ',', double quotes keep a separator inside a label ("dog;\"rain, heavy\"").

    Raises FinelapError for an empty list, an empty label or a duplicate.
    """
    items = split_labels(labels) if isinstance(labels, str) else list(labels)
    out = [str(x).strip() for x in items]
    if isinstance(labels, str):
        out = [x for x in out if x]  # "dog;rain;" is forgiving on the command line
    if not out:
        raise FinelapError("empty label list: give at least one label, e.g. --labels 'dog;rain;siren'")
    for x in out:
        if not x:
            raise FinelapError(f"empty label in {list(items)!r}")
    seen = set()
    for x in out:
        if x in seen:
            raise FinelapError(f"duplicate label {x!r} in the label list")
        seen.add(x)
    return out


def apply_template(labels: Sequence[str], template: str) -> list[str]:
    """Prompts for labels or phrases: `finelap.scoring.make_prompt`, the one rule everywhere."""
    try:
        return make_prompts(template, labels)
    except FinelapError as e:
        raise ConfigError(str(e)) from None
