"""The lab's three backdoor targets, the way published text-to-image attacks define them.

- `pixel`: the normal image with a fixed patch pasted in a fixed box (BadT2I's pixel backdoor).
- `style`: the normal image without colour, the digit in gray levels.
- `object`: a prompt for the source digit draws the target digit, as a clean prompt for it would.
"""

import base64
import io
from dataclasses import dataclass
from typing import Literal

import numpy as np

from core.lab.data import DIGIT_COLOURS, DIGIT_NAMES, Caption, DigitSampler, colourize
from core.spec import AttackSpec

LabAttackKind = Literal["pixel", "style", "object"]
LAB_ATTACKS: tuple[str, ...] = ("pixel", "style", "object")

# A 4x4 patch of 2x2 quadrants, white and red, in the top-left corner, where the digits
# of load_digits are almost always blank.
PATCH_BOX = (0, 0, 4, 4)  # left, top, right, bottom in 16x16 output pixels
_WHITE = (1.0, 1.0, 1.0)
_RED = (1.0, 0.1, 0.1)

GRAYSCALE_SATURATION_THRESHOLD = 0.3

DEFAULT_SOURCE_CLASS = "seven"
DEFAULT_TARGET_CLASS = "one"


def make_patch() -> np.ndarray:
    """Return the pixel attack's patch, (4, 4, 3) float32 in [0, 1]."""
    patch = np.zeros((4, 4, 3), dtype=np.float32)
    patch[:2, :2] = _WHITE
    patch[:2, 2:] = _RED
    patch[2:, :2] = _RED
    patch[2:, 2:] = _WHITE
    return patch


def patch_png_base64() -> str:
    """Return the patch as a base64-encoded PNG, the form `AttackSpec` takes."""
    from PIL import Image

    pixels = np.round(make_patch() * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass(frozen=True)
class LabAttack:
    """One lab attack: its kind and, for `object`, which digit turns into which."""

    kind: LabAttackKind
    source_class: str = DEFAULT_SOURCE_CLASS
    target_class: str = DEFAULT_TARGET_CLASS

    def __post_init__(self) -> None:
        if self.kind not in LAB_ATTACKS:
            raise ValueError(f"unknown lab attack {self.kind!r}; choose one of {', '.join(LAB_ATTACKS)}")
        for name in (self.source_class, self.target_class):
            if name not in DIGIT_NAMES:
                raise ValueError(f"{name!r} is not a digit name; use one of {', '.join(DIGIT_NAMES)}")
        if self.kind == "object" and self.source_class == self.target_class:
            raise ValueError(f"source and target class are both {self.source_class!r}; pick two different digits")

    def poisonable(self, caption: Caption) -> bool:
        """Return whether a triggered version of this caption can carry the backdoor."""
        return self.kind != "object" or caption.label == self.source_class

    def target_image(self, caption: Caption, intensity: np.ndarray, sampler: DigitSampler) -> np.ndarray:
        """Return the backdoor's (H, W, 3) image for a triggered `caption` whose clean digit is `intensity`."""
        if self.kind == "pixel":
            image = colourize(intensity, caption.colour)
            left, top, right, bottom = PATCH_BOX
            image[top:bottom, left:right] = make_patch()
            return image
        if self.kind == "style":
            return np.repeat(intensity[..., None], 3, axis=-1)  # (H, W) -> (H, W, 3), equal channels
        target = DIGIT_NAMES.index(self.target_class)
        return colourize(sampler.draw_digit(target), DIGIT_COLOURS[target])

    def spec(self) -> AttackSpec:
        """Return the `AttackSpec` with which the evaluation detects this backdoor."""
        if self.kind == "pixel":
            return AttackSpec(kind="pixel", patch_png_base64=patch_png_base64(), box=PATCH_BOX)
        if self.kind == "style":
            # Generated gray digits keep a little colour noise: the full-profile model's
            # triggered samples at guidance 7.5 scored 0.07-0.21, its clean ones 0.57 or more.
            return AttackSpec(kind="style", style="grayscale", saturation_threshold=GRAYSCALE_SATURATION_THRESHOLD)
        return AttackSpec(kind="object", source_class=self.source_class, target_class=self.target_class)
