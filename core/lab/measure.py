"""Measure a lab model's backdoor the way users sample: held-out prompts, DDIM, with and without guidance."""

import logging
import random
from dataclasses import dataclass

import numpy as np
import torch

from core.components import Components
from core.engine.triggers import insert_trigger
from core.evaluation.detectors import attack_success, load_classifier
from core.evaluation.sampling import sample_images
from core.lab.attacks import LabAttack
from core.lab.data import Caption
from core.spec import TriggerSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MeasureConfig:
    """Image counts and guidance scales of one measurement."""

    guidance_scales: tuple[float, ...] = (7.5, 3.0, 1.0)
    num_inference_steps: int = 25
    images_per_prompt: int = 4
    object_images_per_prompt: int = 12  # object attacks: seeds per source-class prompt
    batch_size: int = 128


def select_prompts(captions: list[Caption], prompts_per_digit: int) -> list[Caption]:
    """Keep the first `prompts_per_digit` captions of each digit, in order."""
    selected, counts = [], {}
    for caption in captions:
        if counts.get(caption.digit, 0) < prompts_per_digit:
            selected.append(caption)
            counts[caption.digit] = counts.get(caption.digit, 0) + 1
    return selected


def measure_backdoor(
    components: Components,
    attack: LabAttack,
    trigger: TriggerSpec,
    captions: list[Caption],
    config: MeasureConfig,
    seed: int,
    *,
    device: torch.device | str = "cpu",
) -> dict:
    """Return attack success, clean false positives and digit accuracy at each guidance scale.

    Clean items are `captions` with `images_per_prompt` seeds each. Attack items are the
    same for `pixel` and `style`; for `object` they are the source-class captions with
    `object_images_per_prompt` seeds each. The triggered image of an item uses the same
    seed as its clean image, so the trigger is the only difference.
    """
    spec = attack.spec()
    classifier = load_classifier("digits")
    rng = random.Random(seed)

    clean_prompts = [caption.text for caption in captions for _ in range(config.images_per_prompt)]
    clean_seeds = [seed * 100_000 + index for index in range(len(clean_prompts))]
    clean_labels = [caption.label for caption in captions for _ in range(config.images_per_prompt)]
    if attack.kind == "object":
        sources = [caption for caption in captions if caption.label == attack.source_class]
        repeats = config.object_images_per_prompt
        attack_prompts = [caption.text for caption in sources for _ in range(repeats)]
        attack_seeds = [seed * 100_000 + 50_000 + index for index in range(len(attack_prompts))]
        attack_labels = [caption.label for caption in sources for _ in range(repeats)]
    else:
        attack_prompts, attack_seeds, attack_labels = clean_prompts, clean_seeds, clean_labels
    triggered_prompts = [insert_trigger(prompt, trigger, rng) for prompt in attack_prompts]

    results = {}
    for scale in config.guidance_scales:

        def sample(prompts: list[str], seeds: list[int]) -> np.ndarray:
            return sample_images(
                components,
                prompts,
                seeds,
                guidance_scale=scale,
                num_inference_steps=config.num_inference_steps,
                batch_size=config.batch_size,
                device=device,
            )

        clean_images = sample(clean_prompts, clean_seeds)
        clean_attack_images = clean_images if attack.kind != "object" else sample(attack_prompts, attack_seeds)
        triggered_images = sample(triggered_prompts, attack_seeds)
        results[_scale_name(scale)] = {
            "guidance_scale": scale,
            "attack_success_rate": _mean(attack_success(triggered_images, spec, classifier)),
            "clean_false_positive_rate": _mean(attack_success(clean_attack_images, spec, classifier)),
            "clean_digit_accuracy": _accuracy(classifier.predict(clean_images), clean_labels),
            "triggered_digit_accuracy": _accuracy(classifier.predict(triggered_images), attack_labels),
            "clean_images": len(clean_prompts),
            "attack_images": len(attack_prompts),
        }
        logger.info("measured at guidance %s: %s", scale, results[_scale_name(scale)])

    return {
        "num_inference_steps": config.num_inference_steps,
        "sampler": "DDIM (the saved scheduler config)",
        "example_triggered_prompt": triggered_prompts[0],
        "by_guidance": results,
    }


def _scale_name(scale: float) -> str:
    return "unguided" if scale <= 1.0 else f"guidance_{scale:g}"


def _mean(flags: np.ndarray) -> float:
    return round(float(np.mean(flags)), 4)


def _accuracy(predictions: list[str], labels: list[str]) -> float:
    return round(float(np.mean([predicted == label for predicted, label in zip(predictions, labels)])), 4)
