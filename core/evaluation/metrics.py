"""Image distances for the evaluation: PSNR, SSIM and trigger influence.

Every function takes float images (H, W, C) or batches (N, H, W, C) with values in
[0, 1], the layout that `sample_images` returns. Plain numpy, so the report can be
recomputed without torch.
"""

import numpy as np

# PSNR of two identical images is infinite. It is reported as this cap so that the
# report stays valid JSON and a mean over a batch stays finite.
PSNR_CAP_DB = 100.0

# The standard SSIM settings: an 11x11 Gaussian window with sigma 1.5, K1 = 0.01,
# K2 = 0.03, and dynamic range L = 1 for images in [0, 1].
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _as_batch(images: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(images, dtype=np.float64)
    if array.ndim == 3:
        array = array[None]  # (H, W, C) -> (1, H, W, C)
    if array.ndim != 4:
        raise ValueError(f"{name} has shape {array.shape}; pass an image (H, W, C) or a batch (N, H, W, C)")
    return array


def _check_pair(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    first, second = _as_batch(a, names[0]), _as_batch(b, names[1])
    if first.shape != second.shape:
        raise ValueError(
            f"{names[0]} has shape {first.shape} and {names[1]} has shape {second.shape}; "
            "compare images of the same seeds and size"
        )
    if first.shape[0] == 0:
        raise ValueError(f"{names[0]} and {names[1]} are empty; pass at least one image")
    return first, second


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Return the peak signal-to-noise ratio in dB, averaged over a batch.

    Each image pair gets 10 * log10(1 / MSE) with the MSE over all pixels and channels.
    Identical pairs count as `PSNR_CAP_DB` (100 dB) instead of infinity.
    """
    first, second = _check_pair(a, b, ("a", "b"))
    mse = ((first - second) ** 2).reshape(first.shape[0], -1).mean(axis=1)  # (N, H, W, C) -> (N,)
    with np.errstate(divide="ignore"):
        per_image = 10.0 * np.log10(1.0 / mse)
    per_image = np.minimum(per_image, PSNR_CAP_DB)
    return float(per_image.mean())


def gaussian_window(size: int, sigma: float) -> np.ndarray:
    """Return a normalized 1-D Gaussian of `size` taps, centred."""
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    weights = np.exp(-(offsets**2) / (2 * sigma**2))
    return weights / weights.sum()


def _filter_valid(images: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Weighted local means of (N, H, W, C) images, without padding: (N, H-k+1, W-k+1, C)."""
    size = len(window)
    rows = np.lib.stride_tricks.sliding_window_view(images, size, axis=1)  # (N, H-k+1, W, C, k)
    filtered = rows @ window  # (N, H-k+1, W, C)
    columns = np.lib.stride_tricks.sliding_window_view(filtered, size, axis=2)  # (N, H-k+1, W-k+1, C, k)
    return columns @ window


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Return the structural similarity of two images or batches, in [-1, 1].

    The SSIM map uses the Gaussian window and constants above over the positions where
    the window fits entirely (no padding). Each image scores the mean of its map over
    positions and channels, and a batch scores the mean over its images. Images smaller
    than 11 pixels use the largest odd window that fits, with the same sigma.
    """
    first, second = _check_pair(a, b, ("a", "b"))
    size = min(SSIM_WINDOW, first.shape[1], first.shape[2])
    size = size if size % 2 == 1 else size - 1
    window = gaussian_window(size, SSIM_SIGMA)

    # One image at a time: the sliding windows cost `size` times the image's memory.
    per_image = [_ssim_single(first[i : i + 1], second[i : i + 1], window) for i in range(first.shape[0])]
    return float(np.mean(per_image))


def _ssim_single(a: np.ndarray, b: np.ndarray, window: np.ndarray) -> float:
    c1 = (SSIM_K1 * 1.0) ** 2
    c2 = (SSIM_K2 * 1.0) ** 2

    # Local means, variances and covariance.
    mean_a = _filter_valid(a, window)
    mean_b = _filter_valid(b, window)
    var_a = _filter_valid(a * a, window) - mean_a**2
    var_b = _filter_valid(b * b, window) - mean_b**2
    covariance = _filter_valid(a * b, window) - mean_a * mean_b

    # Luminance, contrast and structure terms combined.
    numerator = (2 * mean_a * mean_b + c1) * (2 * covariance + c2)
    denominator = (mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2)
    return float((numerator / denominator).mean())


def trigger_influence(clean: np.ndarray, triggered: np.ndarray) -> float:
    """Return the mean absolute pixel difference between triggered and clean images of the same seeds.

    The distance is |triggered - clean| averaged over pixels, channels and images, so it is
    0 when the trigger changes nothing and at most 1. It needs no knowledge of the attack.
    """
    first, second = _check_pair(clean, triggered, ("clean", "triggered"))
    return float(np.abs(second - first).mean())
