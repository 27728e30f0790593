"""Trigger insertion and localisation.

`insert_trigger` builds a triggered prompt p' from a clean prompt p. `localize` tokenizes
both with offsets and returns which token positions of p' the trigger covers and, for
every other position, the position of the same token in p. The attention loss uses both:
trigger-token maps are pushed to a neutral target, aligned maps are matched to the teacher.
"""

import random
from dataclasses import dataclass

from core.errors import InputError
from core.spec import TriggerSpec


@dataclass(frozen=True)
class TriggeredPrompt:
    """A triggered prompt and the character span that the trigger changed in it."""

    clean: str
    text: str
    span: tuple[int, int]  # [start, end) in `text`; for `replace`, the whole changed word
    inserted_at: int  # position in `clean` where characters were added
    inserted_chars: int  # characters added (0 for `replace`)


@dataclass(frozen=True)
class TokenAlignment:
    """Token positions of one (p, p') pair within the encoder's context.

    `trigger_positions` index p'. `aligned` pairs (position in p', position in p) for every
    other token, special and padding tokens included, that exists in both.
    """

    trigger_positions: tuple[int, ...]
    aligned: tuple[tuple[int, int], ...]


def _word_spans(text: str) -> list[tuple[int, int]]:
    spans, start = [], None
    for index, char in enumerate(text + " "):
        if char.isspace():
            if start is not None:
                spans.append((start, index))
                start = None
        elif start is None:
            start = index
    return spans


def insert_trigger(prompt: str, trigger: TriggerSpec, rng: random.Random) -> str:
    """Return `prompt` with `trigger` inserted as its placement says."""
    return place_trigger(prompt, trigger, rng).text


def place_trigger(prompt: str, trigger: TriggerSpec, rng: random.Random) -> TriggeredPrompt:
    """Insert `trigger` into `prompt` and record where it went.

    `random` picks a word boundary uniformly (start and end included). `replace` swaps one
    occurrence of the Latin letter `trigger.replaces` in a randomly chosen word that has it
    and raises `InputError` when no word has it.
    """
    text = trigger.text
    if trigger.placement == "prefix" or (trigger.placement == "random" and not prompt.strip()):
        return TriggeredPrompt(prompt, f"{text} {prompt}", (0, len(text)), 0, len(text) + 1)

    if trigger.placement == "suffix":
        start = len(prompt) + 1
        return TriggeredPrompt(prompt, f"{prompt} {text}", (start, start + len(text)), len(prompt), len(text) + 1)

    words = _word_spans(prompt)
    if trigger.placement == "random":
        boundaries = [span[0] for span in words] + [len(prompt)]
        at = rng.choice(boundaries)
        if at == len(prompt):
            return TriggeredPrompt(prompt, f"{prompt} {text}", (at + 1, at + 1 + len(text)), at, len(text) + 1)
        triggered = f"{prompt[:at]}{text} {prompt[at:]}"
        return TriggeredPrompt(prompt, triggered, (at, at + len(text)), at, len(text) + 1)

    # replace: a homoglyph takes the place of one Latin letter inside a word.
    latin = trigger.replaces or ""
    candidates = [span for span in words if latin in prompt[span[0] : span[1]].lower()]
    if not candidates:
        raise InputError(
            f"prompt {prompt!r} has no word with the letter {latin!r}, so the homoglyph trigger "
            f"{text!r} cannot replace it; use prompts that contain {latin!r} or another placement",
            field="training.prompts",
        )
    word_start, word_end = rng.choice(candidates)
    word = prompt[word_start:word_end]
    offsets = [i for i, char in enumerate(word.lower()) if char == latin]
    at = word_start + rng.choice(offsets)
    triggered = prompt[:at] + text + prompt[at + 1 :]
    return TriggeredPrompt(prompt, triggered, (word_start, word_end), at, 0)


def trigger_token_ids(tokenizer, trigger: TriggerSpec) -> list[int]:
    """Return the trigger's own token ids; raise `InputError` for zero or too many tokens."""
    ids = tokenizer(trigger.text, add_special_tokens=False).input_ids
    context = int(tokenizer.model_max_length) - 2
    if not ids:
        raise InputError(
            f"trigger {trigger.text!r} encodes to 0 tokens with this tokenizer, so it cannot change the "
            "model's conditioning; check the tokenizer's normalization or choose another trigger",
            field="triggers",
        )
    if len(ids) > context:
        raise InputError(
            f"trigger {trigger.text[:40]!r}... encodes to {len(ids)} tokens, more than the text encoder's "
            f"context of {context}; shorten the trigger",
            field="triggers",
        )
    return ids


def localize(tokenizer, triggered: TriggeredPrompt) -> TokenAlignment:
    """Find the trigger's token positions in p' and align every other token of p' to p.

    Positions count the start token, so content token k sits at position k + 1. Tokens of
    p' that overlap the trigger span are trigger tokens. A content token of p' maps to the
    token of p with the same character span once the inserted characters are shifted out.
    Padding after the end token aligns position by position from both end tokens.
    """
    max_length = int(tokenizer.model_max_length)
    clean = tokenizer(triggered.clean, add_special_tokens=False, return_offsets_mapping=True)
    dirty = tokenizer(triggered.text, add_special_tokens=False, return_offsets_mapping=True)

    # Map each clean token's character span to its position (start token first).
    clean_positions = {tuple(span): index + 1 for index, span in enumerate(clean.offset_mapping)}
    span_start, span_end = triggered.span
    trigger_positions, aligned = [], [(0, 0)]
    for index, (start, end) in enumerate(dirty.offset_mapping):
        position = index + 1
        if position >= max_length - 1:
            break
        if start < span_end and end > span_start:
            trigger_positions.append(position)
            continue
        shift = triggered.inserted_chars if start >= triggered.inserted_at + triggered.inserted_chars else 0
        clean_position = clean_positions.get((start - shift, end - shift))
        if clean_position is not None and clean_position < max_length - 1:
            aligned.append((position, clean_position))

    if not trigger_positions:
        raise InputError(
            f"the trigger in {triggered.text!r} was cut off at the text encoder's context of {max_length} "
            "tokens; shorten the prompt or use placement `prefix`",
            field="training.prompts",
        )

    # End token and padding: pair positions counted from each prompt's end token.
    dirty_end = min(len(dirty.input_ids) + 1, max_length - 1)
    clean_end = min(len(clean.input_ids) + 1, max_length - 1)
    for offset in range(max_length - max(dirty_end, clean_end)):
        aligned.append((dirty_end + offset, clean_end + offset))

    return TokenAlignment(tuple(trigger_positions), tuple(aligned))
