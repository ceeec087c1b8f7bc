"""The rule book of a request's text: the prompt, the concept words, their weights and
reference prompts, how many concepts, and the defaults. The library's call, the CLI and
the gateway (multipart and JSON bodies) all ask `prompt_problems` / `concept_problems`
and only render the problems in their own error shapes, so a word one of them accepts is
never refused by another. Numbers come from `limits`; torch-free, stdlib only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .limits import LIMITS, TEXT_LIMITS

__all__ = ["DEFAULT_WEIGHT", "PRESETS", "DEFAULT_PRESET", "Problem", "normalize_word",
           "word_in_prompt", "prompt_problems", "count_problem", "concept_problems"]

# A concept's RSA/RBA weight when none is given (the authors' configs use 3).
DEFAULT_WEIGHT = 3.0
# "authors" reproduces the code that made the published images; "paper" is the paper's
# equations alone.
PRESETS = ("authors", "paper")
DEFAULT_PRESET = "authors"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a request. `field` is its place in the request ("prompt",
    "concepts", "concepts[1].word"); `index` and `part` say the same for a concept's
    field, so an app can name it its own way (the CLI says `--concept hat weight`).
    `code` is the gateway's error code."""

    code: str
    field: str
    message: str
    index: int | None = None
    part: str = ""

    def text(self, label: str | None = None) -> str:
        """The message after its field's name (or `label`): a predicate ("must be ...")
        follows the name, a statement follows a colon."""
        name = self.field if label is None else label
        sep = " " if self.message.startswith("must ") else ": "
        return f"{name}{sep}{self.message}"


def normalize_word(word: str) -> str:
    """The identity of a concept word: case and the spacing between words ignored, as
    `word_in_prompt` ignores them ("Red  Hat" and "red hat" are one word)."""
    return " ".join(word.lower().split())


def word_in_prompt(word: str, prompt: str) -> bool:
    """The word (or the words of a phrase) stands alone in the prompt, ignoring case and
    the spacing between words (the tokenizer's own check follows at sampling)."""
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in word.split()) + r"(?!\w)"
    return re.search(pattern, prompt, flags=re.IGNORECASE) is not None


def _text_problem(name: str, value: Any, field: str, code: str, *, required: bool,
                  index: int | None = None, part: str = "") -> Problem | None:
    def problem(message: str) -> Problem:
        return Problem(code, field, message, index, part)

    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        return problem("must be a non-empty string" if required else "must be a string")
    most = TEXT_LIMITS[name]
    if len(value) > most:
        return problem(f"must be at most {most} characters, got {len(value)}")
    return None


def prompt_problems(prompt: Any) -> list[Problem]:
    """The prompt: a non-empty string within its length limit."""
    p = _text_problem("prompt", prompt, "prompt", "invalid_prompt", required=True)
    return [p] if p else []


def _weight_problem(weight: Any, field: str, index: int) -> Problem | None:
    def problem(message: str) -> Problem:
        return Problem("invalid_concepts", field, message, index, "weight")

    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        return problem(f"must be a number, got {weight!r}")
    try:
        value = float(weight)
    except OverflowError:  # an integer of hundreds of digits (JSON allows them)
        return problem(f"must be in {LIMITS['weight'].describe()}, got a number too large")
    if not math.isfinite(value):
        return problem(f"must be a finite number, got {weight!r}")
    found = LIMITS["weight"].check("", value)
    return problem(found.strip()) if found else None


def _get(concept: Any, key: str) -> Any:
    if isinstance(concept, Mapping):
        return concept.get(key)
    return getattr(concept, key, None)


def count_problem(n: int, *, most: int | None = None, least: int = 1) -> Problem | None:
    """How many concepts: between `least` and `most` (default the limits table's; an
    operator may lower it)."""
    most = int(LIMITS["concepts"].high) if most is None else most
    if n > most:
        return Problem("invalid_concepts", "concepts",
                       f"too many concepts: at most {most}, got {n}")
    if n < least:
        return Problem("invalid_concepts", "concepts",
                       f"at least {least} concept is needed, got {n}")
    return None


def concept_problems(prompt: Any, concepts: Sequence[Any], *, most: int | None = None,
                     least: int = 1,
                     field: Callable[[int, str], str] | None = None) -> list[Problem]:
    """Every problem of the concepts' text fields against the prompt: how many (between
    `least` and `most`, default the limits table's), each word (a non-empty string within
    its limit, used by one concept only, standing in the prompt), each weight (when
    given) and reference prompt. A concept is a mapping or an object with `word`,
    `weight` and `reference_prompt`. `field(i, part)` names concept i's part (default
    "concepts[i].part"). Files (images, masks, boxes) are each app's own to check."""
    name = field or (lambda i, part: f"concepts[{i}].{part}" if part else f"concepts[{i}]")
    bad_count = count_problem(len(concepts), most=most, least=least)
    if bad_count:
        return [bad_count]
    problems: list[Problem] = []
    seen: set[str] = set()
    for i, c in enumerate(concepts):
        word = _get(c, "word")
        bad = _text_problem("word", word, name(i, "word"), "invalid_concepts",
                            required=True, index=i, part="word")
        if bad:
            problems.append(bad)
        else:
            key = normalize_word(word)
            if key in seen:
                problems.append(Problem("invalid_concepts", name(i, "word"),
                                        f"the word '{word}' is used by more than one "
                                        "concept", i, "word"))
            seen.add(key)
            if isinstance(prompt, str) and not word_in_prompt(word, prompt):
                problems.append(Problem("word_not_in_prompt", name(i, "word"),
                                        f"concept word '{word}' does not occur in the "
                                        "prompt", i, "word"))
        weight = _get(c, "weight")
        if weight is not None:
            bad = _weight_problem(weight, name(i, "weight"), i)
            if bad:
                problems.append(bad)
        bad = _text_problem("reference_prompt", _get(c, "reference_prompt"),
                            name(i, "reference_prompt"), "invalid_concepts",
                            required=False, index=i, part="reference_prompt")
        if bad:
            problems.append(bad)
    return problems
