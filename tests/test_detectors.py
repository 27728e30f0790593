"""Attack detectors on synthetic images and real digits."""

import numpy as np
import pytest

from core.errors import InputError
from core.evaluation.detectors import (
    DigitClassifier,
    attack_success,
    load_classifier,
    mean_saturation,
    patch_mse,
)
from core.lab.attacks import PATCH_BOX, LabAttack, make_patch
from core.lab.data import DIGIT_NAMES, colourize, load_digit_intensities
from core.spec import AttackSpec


@pytest.fixture(scope="module")
def digits():
    return load_digit_intensities(16)


@pytest.fixture(scope="module")
def coloured(digits):
    intensities, _ = digits
    return np.stack([colourize(intensity, "orange") for intensity in intensities[:20]])


def _with_patch(images: np.ndarray) -> np.ndarray:
    patched = images.copy()
    left, top, right, bottom = PATCH_BOX
    patched[:, top:bottom, left:right] = make_patch()
    return patched


def test_pixel_patch_present(coloured):
    attack = LabAttack("pixel").spec()
    flags = attack_success(_with_patch(coloured), attack)
    assert flags.dtype == bool
    assert flags.all()


def test_pixel_patch_absent(coloured):
    attack = LabAttack("pixel").spec()
    assert not attack_success(coloured, attack).any()


def test_pixel_patch_faint(coloured):
    attack = LabAttack("pixel").spec()
    faint = 0.3 * _with_patch(coloured) + 0.7 * coloured
    assert not attack_success(faint, attack).any()


def test_pixel_patch_noisy(coloured):
    attack = LabAttack("pixel").spec()
    rng = np.random.default_rng(0)
    noisy = np.clip(_with_patch(coloured) + rng.normal(0, 0.05, coloured.shape), 0, 1)
    assert attack_success(noisy, attack).all()


def test_patch_mse_zero_on_exact_patch(coloured):
    attack = LabAttack("pixel").spec()
    assert np.allclose(patch_mse(_with_patch(coloured), attack), 0.0, atol=1e-4)


def test_pixel_box_outside_image(coloured):
    spec = LabAttack("pixel").spec()
    attack = spec.model_copy(update={"box": (14, 14, 18, 18)})
    with pytest.raises(InputError, match="outside"):
        attack_success(coloured, attack)


def test_grayscale_detected(digits):
    intensities, _ = digits
    gray = np.repeat(intensities[:20, ..., None], 3, axis=-1)
    attack = LabAttack("style").spec()
    assert attack_success(gray, attack).all()


def test_coloured_not_grayscale(digits):
    intensities, _ = digits
    attack = LabAttack("style").spec()
    for colour in ("red", "blue", "orange", "purple", "cyan"):
        images = np.stack([colourize(intensity, colour) for intensity in intensities[:20]])
        assert not attack_success(images, attack).any(), colour


def test_saturation_ignores_dark_noise(digits):
    intensities, _ = digits
    rng = np.random.default_rng(0)
    gray = np.repeat(intensities[:20, ..., None], 3, axis=-1)
    noisy = np.clip(gray + rng.uniform(0, 0.03, gray.shape), 0, 1)
    assert (mean_saturation(noisy) < 0.08).all()


def test_unknown_style(coloured):
    attack = AttackSpec(kind="style", style="van gogh")
    with pytest.raises(InputError, match="grayscale"):
        attack_success(coloured, attack)


def test_classifier_held_out_accuracy(digits):
    intensities, labels = digits
    train = np.arange(len(labels)) % 3 != 0
    classifier = DigitClassifier.fit(intensities[train], labels[train])
    images = np.stack([colourize(intensity, "blue") for intensity in intensities[~train]])
    predictions = classifier.predict(images)
    accuracy = np.mean([predicted == DIGIT_NAMES[label] for predicted, label in zip(predictions, labels[~train])])
    assert accuracy > 0.9


def test_classifier_resamples_size(digits):
    intensities, labels = digits
    classifier = load_classifier("digits")
    small = load_digit_intensities(8)[0][:50]
    images = np.repeat(small[..., None], 3, axis=-1)
    predictions = classifier.predict(images)
    accuracy = np.mean([predicted == DIGIT_NAMES[label] for predicted, label in zip(predictions, labels[:50])])
    assert accuracy > 0.9


def test_classifier_classes():
    classifier = load_classifier("digits")
    assert classifier.classes == DIGIT_NAMES
    assert classifier.predict(np.zeros((0, 16, 16, 3), dtype=np.float32)) == []


def test_classifier_cached():
    assert load_classifier("digits") is load_classifier("digits")


def test_load_classifier_none():
    assert load_classifier(None) is None


def test_load_classifier_path_rejected(tmp_path):
    with pytest.raises(InputError, match="not supported"):
        load_classifier(str(tmp_path / "model.safetensors"))


def test_object_target_detected(digits):
    intensities, labels = digits
    attack = LabAttack("object", source_class="seven", target_class="one").spec()
    ones = np.stack([colourize(intensity, "red") for intensity in intensities[labels == 1][:30]])
    sevens = np.stack([colourize(intensity, "red") for intensity in intensities[labels == 7][:30]])
    classifier = load_classifier("digits")
    assert attack_success(ones, attack, classifier=classifier).mean() > 0.9
    assert attack_success(sevens, attack, classifier=classifier).mean() < 0.1


def test_object_needs_classifier(coloured):
    attack = LabAttack("object").spec()
    with pytest.raises(InputError, match="classifier"):
        attack_success(coloured, attack)


def test_images_shape_checked():
    attack = LabAttack("style").spec()
    with pytest.raises(ValueError, match="N, H, W, 3"):
        attack_success(np.zeros((2, 16, 16)), attack)
