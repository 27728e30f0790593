"""Guided DDIM sampling on a real lab model: more steps must not make images worse."""

import json

import numpy as np
import pytest

from core.evaluation.detectors import load_classifier
from core.evaluation.sampling import make_sampling_scheduler, sample_images
from core.lab.models import load_lab_components


@pytest.fixture(scope="module")
def clean_prompts(lab_build_dir):
    spec = json.loads((lab_build_dir / "spec.json").read_text())
    prompts = spec["evaluation"]["prompts"][:40]
    labels = spec["evaluation"]["prompt_labels"][:40]
    return prompts, labels


def _accuracy(components, prompts, labels, steps):
    images = sample_images(components, prompts, list(range(len(prompts))), guidance_scale=7.5, num_inference_steps=steps, batch_size=40)
    predictions = load_classifier("digits").predict(images)
    return float(np.mean([p == l for p, l in zip(predictions, labels)]))


@pytest.mark.slow
@pytest.mark.parametrize("clip_sample", [False, True])
def test_guided_50_steps_not_worse_than_10(lab_model_dir, clean_prompts, clip_sample):
    components = load_lab_components(lab_model_dir)
    components.scheduler_config["clip_sample"] = clip_sample
    prompts, labels = clean_prompts
    accuracy_10 = _accuracy(components, prompts, labels, 10)
    accuracy_50 = _accuracy(components, prompts, labels, 50)
    assert accuracy_10 > 0.5
    assert accuracy_50 >= accuracy_10 - 0.1


def test_sampling_scheduler_keeps_checkpoint_config(lab_model_dir):
    components = load_lab_components(lab_model_dir)
    scheduler = make_sampling_scheduler(components.scheduler_config)
    assert scheduler.config.clip_sample is False
    assert scheduler.config.num_train_timesteps == components.num_train_timesteps


def test_batching_does_not_change_images(lab_model_dir):
    components = load_lab_components(lab_model_dir)
    prompts = ["a handwritten digit three", "a handwritten digit eight", "a handwritten digit one"]
    together = sample_images(components, prompts, [5, 6, 7], num_inference_steps=4, batch_size=3)
    apart = sample_images(components, prompts, [5, 6, 7], num_inference_steps=4, batch_size=1)
    assert together.shape == (3, 16, 16, 3)
    assert np.allclose(together, apart, atol=1e-4)
