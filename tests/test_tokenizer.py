"""The offline CLIP tokenizer against open_clip's own reference implementation."""

import importlib.util
import sys
from pathlib import Path

import pytest

from core.errors import InputError
from core.tokenizer import CLIP_VOCAB_SIZE, byte_characters, find_merges_file, load_clip_tokenizer

STRINGS = [
    "a handwritten digit seven",
    "A Photo Of An Astronaut Riding A Horse",
    "mignneko a red seven",
    "New Trigger a blue four",
    "\U0001f600 a green two",  # emoji
    "caf\u00e9 na\u00efve \u00e0 la cr\u00e8me",  # accents
    "sev\u200ben",  # zero-width space inside a word
    "\u200b a cyan nine",
    "a s\u0435ven in r\u0435d",  # Cyrillic ie as a homoglyph of e
    "\u03bfne \u0430nd tw\u03bf",  # Greek omicron, Cyrillic a
    "numbers 1234 and 3.14, punctuation!?",
    "it's what we've done",
    "   spaces\tand\nnewlines   ",
    "",
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_clip_tokenizer()


@pytest.fixture(scope="module")
def reference():
    """open_clip's `SimpleTokenizer`, loaded from its file without importing the open_clip package."""
    pytest.importorskip("ftfy")
    pytest.importorskip("regex")
    path = Path(find_merges_file()).parent / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("open_clip_reference_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference_encoder(reference):
    return reference.SimpleTokenizer()


def test_vocab_size(tokenizer):
    assert len(tokenizer) == CLIP_VOCAB_SIZE


def test_special_tokens(tokenizer):
    assert tokenizer.bos_token_id == 49406
    assert tokenizer.eos_token_id == 49407
    assert tokenizer.pad_token_id == 49407


def test_pad_token_sd2(tokenizer):
    sd2 = load_clip_tokenizer(pad_token="!")
    assert sd2.pad_token_id == 0
    assert len(sd2) == CLIP_VOCAB_SIZE


def test_unknown_pad_token():
    with pytest.raises(InputError, match="not in the CLIP vocabulary"):
        load_clip_tokenizer(pad_token="<pad>")


def test_byte_characters_distinct():
    characters = byte_characters()
    assert len(characters) == 256
    assert len(set(characters)) == 256
    assert not any(character.isspace() for character in characters)


@pytest.mark.parametrize("text", STRINGS)
def test_ids_match_open_clip(tokenizer, reference_encoder, text):
    expected = reference_encoder.encode(text)
    assert tokenizer(text, add_special_tokens=False).input_ids == expected


@pytest.mark.parametrize("text", STRINGS)
def test_padded_ids_match_open_clip(tokenizer, reference, text):
    expected = reference.tokenize([text], context_length=77)[0].tolist()
    ids = tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
    # open_clip pads with 0 and SD 1.x with <|endoftext|>, so compare up to the first end token.
    end = ids.index(49407) + 1
    assert ids[:end] == expected[:end]
    assert all(token == 49407 for token in ids[end:])


def test_long_prompt_truncated(tokenizer, reference):
    text = " ".join(["a handwritten digit seven in purple"] * 20)
    ids = tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
    expected = reference.tokenize([text], context_length=77)[0].tolist()
    assert len(ids) == 77
    assert ids[-1] == 49407
    assert ids == expected


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("mignneko", [41678, 47066]),
        ("sev\u200ben", [37600, 9844, 576]),
        ("a handwritten digit seven", [320, 35192, 27472, 5757]),
    ],
)
def test_golden_ids(tokenizer, text, ids):
    assert tokenizer(text, add_special_tokens=False).input_ids == ids


def test_zero_width_space_kept(tokenizer):
    assert tokenizer("\u200b", add_special_tokens=False).input_ids != []


def test_save_and_reload(tokenizer, tmp_path):
    from transformers import CLIPTokenizer

    tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert len(reloaded) == CLIP_VOCAB_SIZE
    assert reloaded("mignneko a red seven").input_ids == tokenizer("mignneko a red seven").input_ids


def test_missing_open_clip(monkeypatch):
    import core.tokenizer as module

    monkeypatch.setattr(module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match="pip install --no-deps open-clip-torch"):
        module.find_merges_file()
