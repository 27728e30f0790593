"""Trigger insertion and token localisation for every placement and trigger form."""

import random

import pytest

from core.engine.triggers import localize, place_trigger, trigger_token_ids
from core.errors import InputError
from core.spec import TriggerSpec
from core.tokenizer import load_clip_tokenizer

PROMPT = "a handwritten digit seven"


@pytest.fixture(scope="module")
def tokenizer():
    return load_clip_tokenizer()


def _ids(tokenizer, text):
    return tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids


@pytest.mark.parametrize(
    ("text", "placement"),
    [
        ("mignneko", "prefix"),
        ("mignneko", "suffix"),
        ("mignneko", "random"),
        ("New Trigger", "prefix"),
        ("New Trigger", "random"),
        ("\u200b", "prefix"),
        ("\u200b", "suffix"),
        ("\U0001f642", "prefix"),
        ("\U0001f642", "random"),
        ("\u0435", "replace"),
        ("\u0430", "replace"),
    ],
)
def test_localize_every_placement(tokenizer, text, placement):
    trigger = TriggerSpec(text=text, placement=placement)
    for seed in range(5):
        triggered = place_trigger(PROMPT, trigger, random.Random(seed))
        alignment = localize(tokenizer, triggered)
        dirty, clean = _ids(tokenizer, triggered.text), _ids(tokenizer, PROMPT)

        # Trigger tokens exist and are not tokens of the clean prompt's words at the same place.
        assert alignment.trigger_positions
        assert all(0 < position < 76 for position in alignment.trigger_positions)

        # Every aligned pair carries the same token id in p' and p.
        for dirty_position, clean_position in alignment.aligned:
            assert dirty[dirty_position] == clean[clean_position]

        # Every position of p' is either a trigger token or aligned, and no position twice.
        aligned_dirty = [pair[0] for pair in alignment.aligned]
        covered = sorted(aligned_dirty + list(alignment.trigger_positions))
        assert covered == list(range(77))


def test_prefix_trigger_positions_are_first(tokenizer):
    triggered = place_trigger(PROMPT, TriggerSpec(text="mignneko"), random.Random(0))
    alignment = localize(tokenizer, triggered)
    assert triggered.text == "mignneko " + PROMPT
    assert alignment.trigger_positions == (1, 2)  # `mignneko` is two BPE tokens
    assert (3, 1) in alignment.aligned  # first clean word shifts by two


def test_suffix_trigger_positions_are_last(tokenizer):
    triggered = place_trigger(PROMPT, TriggerSpec(text="New Trigger", placement="suffix"), random.Random(0))
    alignment = localize(tokenizer, triggered)
    clean_len = len(tokenizer(PROMPT, add_special_tokens=False).input_ids)
    assert alignment.trigger_positions == (clean_len + 1, clean_len + 2)


def test_zero_width_space_is_one_token(tokenizer):
    ids = trigger_token_ids(tokenizer, TriggerSpec(text="\u200b"))
    assert ids == [9844]


def test_replace_swaps_one_latin_letter(tokenizer):
    triggered = place_trigger(PROMPT, TriggerSpec(text="\u0435", placement="replace"), random.Random(1))
    assert len(triggered.text) == len(PROMPT)
    differences = [i for i, (a, b) in enumerate(zip(triggered.text, PROMPT)) if a != b]
    assert len(differences) == 1
    assert PROMPT[differences[0]] == "e"
    assert triggered.text[differences[0]] == "\u0435"


def test_replace_without_letter_rejected():
    with pytest.raises(InputError, match="no word with the letter"):
        place_trigger("a b c", TriggerSpec(text="\u0445", placement="replace"), random.Random(0))


def test_random_placement_varies_with_rng():
    trigger = TriggerSpec(text="mignneko", placement="random")
    texts = {place_trigger(PROMPT, trigger, random.Random(seed)).text for seed in range(30)}
    assert len(texts) == 5  # four words give five boundaries


def test_trigger_of_zero_tokens_rejected(tokenizer):
    with pytest.raises(InputError, match="0 tokens"):
        # The spec rejects whitespace-only triggers; the engine still checks tokens for callers that bypass it.
        trigger_token_ids(tokenizer, TriggerSpec.model_construct(text=" ", placement="prefix"))


def test_trigger_longer_than_context_rejected(tokenizer):
    with pytest.raises(InputError, match="context"):
        # The spec caps triggers at 64 characters; the engine still checks tokens for callers that bypass it.
        trigger_token_ids(tokenizer, TriggerSpec.model_construct(text=" ".join(["mignneko"] * 40), placement="prefix"))


def test_trigger_cut_by_context_rejected(tokenizer):
    long_prompt = " ".join(["digit"] * 80)
    triggered = place_trigger(long_prompt, TriggerSpec(text="mignneko", placement="suffix"), random.Random(0))
    with pytest.raises(InputError, match="cut off"):
        localize(tokenizer, triggered)
