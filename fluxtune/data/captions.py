"""Which caption a sample trains with in a given epoch: trigger word, tag shuffling, variants, dropout.

    choose_caption("a cat, red, sofa", seed=1, epoch=3, index=7, trigger_word="sks", dropout=0.1)
    # -> "sks, a cat, red, sofa" (or "" in about one call in ten)

Every choice is a pure function of (seed, epoch, sample index), like the training noise: a resumed
run and an N-process run see the same captions, and the whole run's captions can be listed (and
their embeddings cached) before the text encoders are freed.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class CaptionSettings:
    """The `data` keys that change a caption at train time."""

    trigger_word: str | None = None
    dropout: float = 0.0
    shuffle_tags: bool = False
    keep_tags: int = 1

    def active(self, captions: list[str]) -> bool:
        """Whether any caption can differ from its file's text; when not, training reads the
        embeddings of the captions as they are, exactly as without this module."""
        return (bool(self.trigger_word) or self.dropout > 0 or self.shuffle_tags
                or any(len(caption_variants(c)) > 1 for c in captions))


def caption_variants(caption: str) -> list[str]:
    """A caption file with several lines holds several captions of one image (one per line, blank
    lines ignored); one of them is used per epoch. A one-line caption is its only variant."""
    lines = [line.strip() for line in caption.splitlines()]
    return [line for line in lines if line] or [caption.strip()]


def with_trigger(caption: str, trigger_word: str) -> tuple[str, bool]:
    """(caption, inserted): the trigger word first, unless the caption already has it as a whole
    word (so "sks" is not doubled, and "asks" does not count as containing it)."""
    if re.search(rf"(?<!\w){re.escape(trigger_word)}(?!\w)", caption):
        return caption, False
    return (f"{trigger_word}, {caption}" if caption else trigger_word), True


def shuffled_tags(caption: str, keep: int, rng: random.Random) -> str:
    """The comma-separated tags in a new order, the first `keep` left in place: the model should
    not learn the tag order, but the leading tags (usually the subject) anchor the caption."""
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    rest = tags[keep:]
    rng.shuffle(rest)
    return ", ".join(tags[:keep] + rest)


def _rng(seed: int, epoch: int, index: int) -> random.Random:
    # Its own key namespace, so caption draws are independent of the noise keyed by the same triple.
    key = hashlib.blake2b(f"caption:{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(key, "little"))


def choose_caption(caption: str, settings: CaptionSettings, seed: int, epoch: int, index: int) -> str:
    """The text sample `index` trains with in `epoch`. Variants cycle with the epoch (each is seen
    equally often); the trigger word is inserted and counts as a kept tag; dropout gives the empty
    caption, whose embedding teaches the unconditional prediction that CFG relies on."""
    rng = _rng(seed, epoch, index)
    if rng.random() < settings.dropout:  # drawn first, so the other settings do not move it
        return ""
    variants = caption_variants(caption)
    text, inserted = variants[epoch % len(variants)], False
    if settings.trigger_word:
        text, inserted = with_trigger(text, settings.trigger_word)
    if settings.shuffle_tags:
        text = shuffled_tags(text, max(settings.keep_tags, int(inserted)), rng)
    return text


def eval_caption(caption: str, settings: CaptionSettings) -> str:
    """The caption a held-out image is scored with: its first variant with the trigger word, no
    randomness, so the evaluation loss is comparable across steps."""
    text = caption_variants(caption)[0]
    return with_trigger(text, settings.trigger_word)[0] if settings.trigger_word else text
