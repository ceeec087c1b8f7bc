"""Finding a concept word's token positions in the prompt."""

from __future__ import annotations

from .errors import MagicFaceInputError

__all__ = ["word_token_indices"]


def _starts_word(tokens: list[str], i: int, bos: str | None) -> bool:
    # CLIP BPE marks the last piece of every word with "</w>": a match starts a
    # word only right after <start> or after such a piece ("man" must not match
    # the tail of "woman").
    return i == 0 or tokens[i - 1] == bos or tokens[i - 1].endswith("</w>")


def word_token_indices(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions (in the encoded prompt, <start> at 0) of every sub-token of every
    occurrence of `word` (one word or a phrase) in `prompt`.

    Raises ValueError naming the word when it does not occur, or occurs only past
    the text encoder's token limit.
    """
    if not word or not word.strip():
        raise MagicFaceInputError("concept word must be a non-empty string")
    word_ids = tokenizer(word.strip(), add_special_tokens=False)["input_ids"]
    if not word_ids:
        raise MagicFaceInputError(f"concept word '{word}' has no tokens")
    full_ids = tokenizer(prompt, truncation=False)["input_ids"]
    limit = tokenizer.model_max_length
    tokens = tokenizer.convert_ids_to_tokens(full_ids)
    bos = tokenizer.bos_token
    n = len(word_ids)
    found: list[int] = []
    past_limit = False
    for i in range(len(full_ids) - n + 1):
        if full_ids[i : i + n] == word_ids and _starts_word(tokens, i, bos):
            # The last position (limit - 1) holds <end> after truncation.
            if i + n <= limit - 1:
                found.extend(range(i, i + n))
            else:
                past_limit = True
    if not found:
        if past_limit:
            raise MagicFaceInputError(
                f"concept word '{word}' lies past the {limit}-token prompt limit")
        raise MagicFaceInputError(f"concept word '{word}' does not occur in the prompt {prompt!r}")
    return found
