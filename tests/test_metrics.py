import numpy as np
import pytest
from scipy.signal import correlate2d

from core.evaluation import metrics


def test_psnr_constant_difference():
    a = np.zeros((8, 8, 3))
    b = np.full((8, 8, 3), 0.1)
    # MSE 0.01 -> 10 * log10(1 / 0.01) = 20 dB.
    assert metrics.psnr(a, b) == pytest.approx(20.0)


def test_psnr_identical_is_capped():
    image = np.random.default_rng(0).random((8, 8, 3))
    assert metrics.psnr(image, image) == metrics.PSNR_CAP_DB


def test_psnr_batch_mean_of_images():
    a = np.zeros((2, 4, 4, 3))
    b = np.stack([np.full((4, 4, 3), 0.1), np.full((4, 4, 3), 0.01)])
    # 20 dB and 40 dB per image.
    assert metrics.psnr(a, b) == pytest.approx(30.0)


def test_psnr_shape_mismatch():
    with pytest.raises(ValueError, match="same seeds and size"):
        metrics.psnr(np.zeros((4, 4, 3)), np.zeros((5, 4, 3)))


def test_ssim_identical_is_one():
    image = np.random.default_rng(1).random((2, 16, 16, 3))
    assert metrics.ssim(image, image) == pytest.approx(1.0)


def test_ssim_constant_images():
    a = np.full((16, 16, 3), 0.2)
    b = np.full((16, 16, 3), 0.4)
    c1 = (0.01 * 1.0) ** 2
    # Zero variance: the contrast-structure term is c2 / c2 = 1, leaving the luminance term.
    expected = (2 * 0.2 * 0.4 + c1) / (0.2**2 + 0.4**2 + c1)
    assert metrics.ssim(a, b) == pytest.approx(expected)


def _reference_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of one (H, W, C) pair with 2-D correlation, written independently of metrics.py."""
    taps = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    window = np.outer(taps, taps) / np.outer(taps, taps).sum()
    c1, c2 = 0.01**2, 0.03**2
    scores = []
    for channel in range(a.shape[2]):
        x, y = a[..., channel], b[..., channel]
        mu_x, mu_y = correlate2d(x, window, "valid"), correlate2d(y, window, "valid")
        sigma_x = correlate2d(x * x, window, "valid") - mu_x**2
        sigma_y = correlate2d(y * y, window, "valid") - mu_y**2
        sigma_xy = correlate2d(x * y, window, "valid") - mu_x * mu_y
        ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sigma_x + sigma_y + c2))
        scores.append(ssim_map.mean())
    return float(np.mean(scores))


def test_ssim_matches_2d_reference():
    rng = np.random.default_rng(2)
    a = rng.random((3, 20, 24, 3))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    expected = np.mean([_reference_ssim(a[i], b[i]) for i in range(3)])
    assert metrics.ssim(a, b) == pytest.approx(expected, rel=1e-9)


def test_ssim_inverted_image_negative():
    image = np.random.default_rng(3).random((16, 16, 3))
    assert metrics.ssim(image, 1.0 - image) < 0


def test_ssim_small_image_shrinks_window():
    rng = np.random.default_rng(4)
    a = rng.random((8, 8, 3))
    b = np.clip(a + 0.05, 0, 1)
    score = metrics.ssim(a, b)
    assert 0 < score < 1


def test_trigger_influence_hand_case():
    clean = np.zeros((4, 4, 3))
    triggered = clean.copy()
    triggered[:2, :2] = 1.0
    # 4 of 16 pixels differ by 1 in every channel.
    assert metrics.trigger_influence(clean, triggered) == pytest.approx(0.25)


def test_trigger_influence_zero_when_unchanged():
    clean = np.random.default_rng(5).random((2, 4, 4, 3))
    assert metrics.trigger_influence(clean, clean) == 0.0


def test_metrics_reject_empty_batch():
    with pytest.raises(ValueError, match="empty"):
        metrics.trigger_influence(np.zeros((0, 4, 4, 3)), np.zeros((0, 4, 4, 3)))
