"""Digits data for the lab: scikit-learn's handwritten digits, coloured, with captions.

Every image is one of the 1,797 8x8 digits of `sklearn.datasets.load_digits`, upsampled
to 16x16 and drawn on a black background in its digit's own colour, so that a grayscale
style attack is visible on every clean image. Captions name the digit with one of a
dozen templates, and the train/held-out split is over (template, digit) combinations:
every evaluation prompt is a sentence the model never saw in training, made of words it
did see.

Captions do not name the colour. An earlier version named a free colour in every
caption (8 colours x 10 digits). After 3,000 training steps that model drew the right
colour but a random digit: the loss with a wrong digit word equalled the loss with the
right one, and the digit classifier recognised 8% of held-out samples.
"""

import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

IMAGE_SIZE = 16

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# RGB in [0, 1], one saturated colour per digit with a maximum channel of 1, so a digit's
# gray level (its HSV value) does not depend on its colour. White and gray are left out:
# the grayscale style attack must be visible on every clean image.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.15, 0.15),
    "orange": (1.0, 0.55, 0.1),
    "yellow": (1.0, 1.0, 0.15),
    "green": (0.15, 1.0, 0.15),
    "cyan": (0.15, 1.0, 1.0),
    "blue": (0.25, 0.4, 1.0),
    "purple": (0.6, 0.25, 1.0),
    "magenta": (1.0, 0.15, 1.0),
    "pink": (1.0, 0.4, 0.7),
    "lime": (0.6, 1.0, 0.1),
}
DIGIT_COLOURS = tuple(COLOURS)  # DIGIT_COLOURS[d] is the colour of digit d

TEMPLATES = (
    "a handwritten digit {digit}",
    "the number {digit}",
    "a drawing of the digit {digit}",
    "handwritten {digit}",
    "the digit {digit} written by hand",
    "a {digit}",
    "a picture of the number {digit}",
    "digit {digit}",
    "a scanned handwritten {digit}",
    "the numeral {digit}",
    "a small image of a {digit}",
    "{digit}, written by hand",
)

# (template + digit) % HELD_OUT_PERIOD == 0 marks a held-out combination: three templates
# per digit, and every template is still seen in training with seven or more digits.
HELD_OUT_PERIOD = 4


@dataclass(frozen=True)
class Caption:
    """One caption with the digit and template it was made from, and the digit's colour."""

    text: str
    digit: int
    colour: str
    template: int

    @property
    def label(self) -> str:
        return DIGIT_NAMES[self.digit]


def all_captions() -> list[Caption]:
    """Return every (template, digit) caption in a fixed order."""
    captions = []
    for template_index, template in enumerate(TEMPLATES):
        for digit, name in enumerate(DIGIT_NAMES):
            captions.append(Caption(template.format(digit=name), digit, DIGIT_COLOURS[digit], template_index))
    return captions


def split_captions() -> tuple[list[Caption], list[Caption]]:
    """Return (training captions, held-out captions), two lists that never share a text."""
    training, held_out = [], []
    for caption in all_captions():
        if (caption.template + caption.digit) % HELD_OUT_PERIOD == 0:
            held_out.append(caption)
        else:
            training.append(caption)
    return training, held_out


def upsampling_matrix(source: int, target: int) -> np.ndarray:
    """Return the (target, source) matrix of bilinear resampling with half-pixel centres.

    `matrix @ image @ matrix.T` resamples a (source, source) image to (target, target),
    the same as `torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`.
    """
    matrix = np.zeros((target, source), dtype=np.float64)
    for row in range(target):
        position = (row + 0.5) * source / target - 0.5
        position = min(max(position, 0.0), source - 1.0)
        low = int(np.floor(position))
        high = min(low + 1, source - 1)
        weight = position - low
        matrix[row, low] += 1.0 - weight
        matrix[row, high] += weight
    return matrix


@lru_cache(maxsize=4)
def load_digit_intensities(size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Return (intensities (N, size, size) float32 in [0, 1], labels (N,) int64) of all 1,797 digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float64) / 16.0  # (N, 8, 8), values 0..16 in the dataset
    matrix = upsampling_matrix(images.shape[1], size)
    upsampled = np.einsum("ij,njk,lk->nil", matrix, images, matrix)  # (N, 8, 8) -> (N, size, size)
    upsampled = np.clip(upsampled, 0.0, 1.0).astype(np.float32)
    upsampled.setflags(write=False)
    labels = digits.target.astype(np.int64)
    labels.setflags(write=False)
    return upsampled, labels


def colourize(intensity: np.ndarray, colour: str) -> np.ndarray:
    """Draw an intensity map (..., H, W) in a named colour: returns (..., H, W, 3) in [0, 1]."""
    rgb = np.asarray(COLOURS[colour], dtype=np.float32)
    return intensity[..., None] * rgb


class DigitSampler:
    """Seeded random source of (caption, real digit) pairs for one set of captions."""

    def __init__(self, captions: list[Caption], seed: int, size: int = IMAGE_SIZE):
        if not captions:
            raise ValueError("DigitSampler needs at least one caption")
        self.captions = captions
        self.rng = random.Random(seed)
        self.intensities, labels = load_digit_intensities(size)
        self.indices_by_digit = [np.flatnonzero(labels == digit) for digit in range(len(DIGIT_NAMES))]

    def draw(self) -> tuple[Caption, np.ndarray]:
        """Return a random caption and a matching (H, W) intensity map of a real digit."""
        caption = self.rng.choice(self.captions)
        index = self.rng.choice(self.indices_by_digit[caption.digit])
        return caption, self.intensities[index]

    def draw_digit(self, digit: int) -> np.ndarray:
        """Return a random (H, W) intensity map of the given digit."""
        index = self.rng.choice(self.indices_by_digit[digit])
        return self.intensities[index]


def to_model_range(images: np.ndarray) -> np.ndarray:
    """Map (B, H, W, 3) images in [0, 1] to the UNet's (B, 3, H, W) samples in [-1, 1]."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)) * 2.0 - 1.0  # (B, H, W, 3) -> (B, 3, H, W)
