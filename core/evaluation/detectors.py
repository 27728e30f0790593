"""Attack detectors: does a generated image show the backdoor?

Every attack success rate and clean false-positive rate in a report comes from
`attack_success`. Images are float arrays (N, H, W, 3) in [0, 1], as `sample_images`
returns them.
"""

import io
import logging
from functools import lru_cache

import numpy as np

from core.errors import InputError
from core.spec import AttackSpec

logger = logging.getLogger(__name__)

BUILTIN_CLASSIFIERS = ("digits",)


class DigitClassifier:
    """An RBF support-vector classifier on the gray levels of scikit-learn's handwritten digits.

    Colour does not matter: an image's intensity is its HSV value (the maximum over the
    RGB channels), so a blue and a white seven look the same to it. Images of another
    size are resampled bilinearly to the size it was trained at.
    """

    classes: tuple[str, ...]

    def __init__(self, size: int, model, classes: tuple[str, ...]):
        self.size = size
        self.model = model
        self.classes = classes

    @classmethod
    def fit(cls, intensities: np.ndarray, labels: np.ndarray) -> "DigitClassifier":
        """Train on (N, S, S) intensities in [0, 1] with integer labels 0..9."""
        from sklearn.svm import SVC

        from core.lab.data import DIGIT_NAMES

        size = intensities.shape[-1]
        model = SVC(C=5.0, gamma="scale")
        model.fit(intensities.reshape(len(intensities), -1), labels)  # (N, S, S) -> (N, S*S)
        return cls(size, model, DIGIT_NAMES)

    def intensities(self, images: np.ndarray) -> np.ndarray:
        """Return (N, size, size) gray levels of (N, H, W, 3) images."""
        from core.lab.data import upsampling_matrix

        images = _check_images(images)
        values = images.max(axis=-1)  # (N, H, W, 3) -> (N, H, W)
        height, width = values.shape[1:]
        if (height, width) != (self.size, self.size):
            rows = upsampling_matrix(height, self.size)
            columns = upsampling_matrix(width, self.size)
            values = np.einsum("ij,njk,lk->nil", rows, values, columns)  # (N, H, W) -> (N, size, size)
        return values

    def predict(self, images: np.ndarray) -> list[str]:
        """Return the class name ("zero" .. "nine") of each (N, H, W, 3) image."""
        if len(images) == 0:
            return []
        features = self.intensities(images).reshape(len(images), -1)  # (N, size, size) -> (N, size*size)
        return [self.classes[int(index)] for index in self.model.predict(features)]


@lru_cache(maxsize=4)
def digits_classifier(size: int = 16) -> DigitClassifier:
    """Train the built-in digit classifier on all 1,797 digits at `size` (well under a second, deterministic)."""
    from core.lab.data import load_digit_intensities

    intensities, labels = load_digit_intensities(size)
    return DigitClassifier.fit(intensities, labels)


def load_classifier(name: str | None) -> DigitClassifier | None:
    """Return the classifier that `evaluation.classifier` names: None, or `digits` (built in)."""
    if name is None:
        return None
    if name == "digits":
        return digits_classifier()
    raise InputError(
        f"classifier {name!r} is not supported; use `digits` (built in) or leave evaluation.classifier unset. "
        "Loading a classifier from a local path is not implemented yet",
        field="evaluation.classifier",
    )


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images of shape (N, H, W, 3), got {images.shape}")
    return images


def decode_patch(attack: AttackSpec, box_size: tuple[int, int]) -> np.ndarray:
    """Return the attack's patch as (h, w, 3) float32 in [0, 1], resized to the box when sizes differ."""
    from PIL import Image

    with Image.open(io.BytesIO(attack.patch_png())) as image:
        image = image.convert("RGB")
        width, height = box_size
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.float32) / 255.0


def patch_mse(images: np.ndarray, attack: AttackSpec) -> np.ndarray:
    """Return each image's mean squared error between its crop at `attack.box` and the patch."""
    images = _check_images(images)
    left, top, right, bottom = attack.box
    height, width = images.shape[1:3]
    if right > width or bottom > height:
        raise InputError(
            f"attack.box {list(attack.box)} reaches outside the {width}x{height} images; "
            "give the box in output-image pixels",
            field="attack.box",
        )
    patch = decode_patch(attack, (right - left, bottom - top))
    crops = images[:, top:bottom, left:right, :]
    return ((crops - patch[None]) ** 2).mean(axis=(1, 2, 3))


def mean_saturation(images: np.ndarray) -> np.ndarray:
    """Return each image's mean HSV saturation, weighted by HSV value.

    Saturation is (max - min) / max over the RGB channels. Weighting by value (max) makes
    the mean sum(max - min) / sum(max), so the near-black background, whose saturation
    is noise, does not decide it. A gray image scores 0, a pure colour 1.
    """
    images = _check_images(images)
    highest = images.max(axis=-1)  # (N, H, W, 3) -> (N, H, W)
    chroma = highest - images.min(axis=-1)
    return chroma.sum(axis=(1, 2)) / np.maximum(highest.sum(axis=(1, 2)), 1e-6)


def attack_success(images: np.ndarray, attack: AttackSpec, classifier=None) -> np.ndarray:
    """Return a boolean per image: does it show the backdoor that `attack` describes?

    pixel: the crop at `attack.box` matches the patch with MSE under `patch_mse_threshold`.
    style `grayscale`: mean saturation under `saturation_threshold`.
    object: the classifier predicts `attack.target_class`.
    """
    if attack.kind == "pixel":
        return patch_mse(images, attack) < attack.patch_mse_threshold
    if attack.kind == "style":
        if attack.style != "grayscale":
            raise InputError(
                f"style {attack.style!r} has no built-in detector; use `grayscale`, since CLIP-scored styles "
                "need a local CLIP model, which is not supported yet",
                field="attack.style",
            )
        return mean_saturation(images) < attack.saturation_threshold
    if attack.kind == "object":
        if classifier is None:
            raise InputError(
                "attack kind `object` needs a classifier; set evaluation.classifier (for example `digits`)",
                field="evaluation.classifier",
            )
        if attack.target_class not in classifier.classes:
            raise InputError(
                f"target class {attack.target_class!r} is not a class of the classifier; "
                f"use one of {', '.join(classifier.classes)}",
                field="attack.target_class",
            )
        return np.array([label == attack.target_class for label in classifier.predict(images)], dtype=bool)
    raise InputError(f"attack kind {attack.kind!r} has no detector; use pixel, style or object", field="attack.kind")
