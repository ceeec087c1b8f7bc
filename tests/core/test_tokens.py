from __future__ import annotations

import pytest

from magicface_core.tokens import word_token_indices


def pieces(tok, prompt, idx):
    ids = tok(prompt)["input_ids"]
    return "".join(tok.convert_ids_to_tokens([ids[i] for i in idx])).replace("</w>", " ").strip()


def test_single_token_word(pipe):
    tok = pipe.tokenizer
    idx = word_token_indices(tok, "a man wearing a hat", "hat")
    assert len(idx) == 1 and pieces(tok, "a man wearing a hat", idx) == "hat"


def test_all_sub_tokens_of_a_multi_token_word(pipe):
    tok = pipe.tokenizer
    prompt = "a man with a hat wearing sunglasses"
    idx = word_token_indices(tok, prompt, "sunglasses")
    assert len(idx) == len("sunglasses")  # the tiny vocab spells it out
    assert idx == list(range(idx[0], idx[0] + len(idx)))
    assert pieces(tok, prompt, idx) == "sunglasses"


def test_word_is_not_matched_inside_another_word(pipe):
    tok = pipe.tokenizer
    with pytest.raises(ValueError, match="'an'"):
        word_token_indices(tok, "a woman with a hat", "an")
    # "man" is a whole token, but must not match the end of "shaman" (spelt out).
    with pytest.raises(ValueError, match="'man'"):
        word_token_indices(tok, "a shaman", "man")


def test_every_occurrence_and_case_insensitivity(pipe):
    tok = pipe.tokenizer
    idx = word_token_indices(tok, "a hat on a HAT", "Hat")
    assert len(idx) == 2


def test_phrase(pipe):
    tok = pipe.tokenizer
    idx = word_token_indices(tok, "a man in a red hat", "red hat")
    assert pieces(tok, "a man in a red hat", idx) == "red hat"


def test_missing_word_names_it(pipe):
    with pytest.raises(ValueError, match="concept word 'scarf' does not occur"):
        word_token_indices(pipe.tokenizer, "a man wearing a hat", "scarf")


def test_word_past_the_token_limit(pipe):
    prompt = "a " * 80 + "hat"
    with pytest.raises(ValueError, match="past the 77-token"):
        word_token_indices(pipe.tokenizer, prompt, "hat")
