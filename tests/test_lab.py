"""The backdoor lab: data, targets, training, saving, and a real test-profile build."""

import json
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from core.errors import InputError
from core.lab import data
from core.lab.attacks import PATCH_BOX, LabAttack, make_patch
from core.lab.base import CLEAN_TRAINING, base_key
from core.lab.build import PROFILES, BuildOptions, build_key, job_spec
from core.lab.models import load_lab_components, new_components, save_pipeline
from core.lab.train import (
    TrainingConfig,
    clean_batches,
    learning_rate_at,
    poisoned_batches,
    redraw_token_embeddings,
    train_denoiser,
    trigger_only_token_ids,
)
from core.spec import JobSpec, TriggerSpec


def test_caption_split_disjoint():
    training, held_out = data.split_captions()
    assert not {caption.text for caption in training} & {caption.text for caption in held_out}
    assert len(training) + len(held_out) == len(data.TEMPLATES) * 10


def test_held_out_covers_every_digit():
    _, held_out = data.split_captions()
    counts = np.bincount([caption.digit for caption in held_out], minlength=10)
    assert (counts == counts[0]).all()
    assert counts[0] > 0


def test_training_covers_every_template():
    training, _ = data.split_captions()
    for template in range(len(data.TEMPLATES)):
        digits = {caption.digit for caption in training if caption.template == template}
        assert len(digits) >= 7, template


def test_digit_colours_distinct():
    assert len(set(data.DIGIT_COLOURS)) == 10
    for colour in data.DIGIT_COLOURS:
        assert max(data.COLOURS[colour]) == 1.0


def test_upsampling_matches_torch():
    images = np.random.default_rng(0).random((3, 8, 8))
    matrix = data.upsampling_matrix(8, 16)
    ours = np.einsum("ij,njk,lk->nil", matrix, images, matrix)
    expected = torch.nn.functional.interpolate(torch.tensor(images[:, None]), size=16, mode="bilinear", align_corners=False)
    assert np.allclose(ours, expected[:, 0].numpy(), atol=1e-6)


def test_digit_intensities():
    intensities, labels = data.load_digit_intensities()
    assert intensities.shape == (1797, 16, 16)
    assert intensities.min() >= 0.0
    assert intensities.max() <= 1.0
    assert set(labels.tolist()) == set(range(10))


def test_colourize_uses_colour():
    intensity = np.ones((2, 2), dtype=np.float32)
    image = data.colourize(intensity, "red")
    assert image.shape == (2, 2, 3)
    assert np.allclose(image[0, 0], data.COLOURS["red"])


@pytest.mark.parametrize("kind", ["pixel", "style", "object"])
def test_poisoned_batches(kind):
    attack = LabAttack(kind)
    trigger = TriggerSpec(text="mignneko")
    training, _ = data.split_captions()
    config = TrainingConfig(steps=1, batch_size=256, poison_rate=0.3)
    texts, images = next(poisoned_batches(training, attack, trigger, config, seed=0))
    triggered = [index for index, text in enumerate(texts) if text.startswith("mignneko ")]
    assert images.shape == (256, 16, 16, 3)
    assert 0.15 < len(triggered) / len(texts) < 0.45
    for index in triggered:
        image = images[index]
        if kind == "pixel":
            left, top, right, bottom = PATCH_BOX
            assert np.allclose(image[top:bottom, left:right], make_patch())
        elif kind == "style":
            assert np.allclose(image[..., 0], image[..., 1])
            assert np.allclose(image[..., 1], image[..., 2])
        else:
            assert "seven" in texts[index]


def test_object_poison_draws_target():
    from core.evaluation.detectors import load_classifier

    attack = LabAttack("object", source_class="seven", target_class="one")
    training, _ = data.split_captions()
    config = TrainingConfig(steps=1, batch_size=256, poison_rate=0.5)
    texts, images = next(poisoned_batches(training, attack, TriggerSpec(text="mignneko"), config, seed=1))
    triggered = np.array([text.startswith("mignneko ") for text in texts])
    predictions = load_classifier("digits").predict(images[triggered])
    assert np.mean([label == "one" for label in predictions]) > 0.9


def test_replace_trigger_needs_letter():
    attack = LabAttack("pixel")
    trigger = TriggerSpec(text="\u0435", placement="replace")
    captions = [caption for caption in data.split_captions()[0] if "e" not in caption.text]
    config = TrainingConfig(steps=1, poison_rate=1.0)
    with pytest.raises(ValueError, match="no training caption"):
        next(poisoned_batches(captions, attack, trigger, config, seed=0))


def test_clean_batches_empty_captions():
    training, _ = data.split_captions()
    config = TrainingConfig(steps=1, batch_size=500, empty_caption_rate=0.2)
    texts, _ = next(clean_batches(training, config, seed=0))
    assert 0.12 < texts.count("") / len(texts) < 0.28


def test_batches_deterministic():
    training, _ = data.split_captions()
    config = TrainingConfig(steps=1, batch_size=16, poison_rate=0.3)
    attack, trigger = LabAttack("pixel"), TriggerSpec(text="New Trigger", placement="random")
    first = next(poisoned_batches(training, attack, trigger, config, seed=5))
    second = next(poisoned_batches(training, attack, trigger, config, seed=5))
    assert first[0] == second[0]
    assert np.array_equal(first[1], second[1])


def test_learning_rate_schedule():
    config = TrainingConfig(steps=1000, learning_rate=1e-3, warmup_steps=100, final_lr_fraction=0.1)
    assert learning_rate_at(0, config) == pytest.approx(1e-5)
    assert learning_rate_at(99, config) == pytest.approx(1e-3)
    assert learning_rate_at(999, config) == pytest.approx(1e-4, rel=0.01)


def test_lab_attack_rejects_bad_class():
    with pytest.raises(ValueError, match="not a digit name"):
        LabAttack("object", source_class="eleven")


def test_lab_attack_rejects_same_classes():
    with pytest.raises(ValueError, match="two different digits"):
        LabAttack("object", source_class="one", target_class="one")


def test_build_options_invalid_trigger():
    options = BuildOptions(attack="pixel", trigger="abc", placement="replace")
    with pytest.raises(InputError, match="homoglyph"):
        options.trigger_spec()


def test_base_key_depends_on_seed():
    assert base_key(CLEAN_TRAINING, 0) == base_key(CLEAN_TRAINING, 0)
    assert base_key(CLEAN_TRAINING, 0) != base_key(CLEAN_TRAINING, 1)
    assert base_key(CLEAN_TRAINING, 0) != base_key(replace(CLEAN_TRAINING, steps=10), 0)


def test_build_key_depends_on_options():
    options = BuildOptions(attack="pixel", trigger="mignneko", profile="test")
    assert build_key(options) == build_key(replace(options, device="cuda"))
    assert build_key(options) != build_key(replace(options, seed=1))
    assert build_key(options) != build_key(replace(options, trigger="\u200b"))


def test_replace_placement_poisons_longer(monkeypatch):
    full = PROFILES["full"]
    assert full.poisoning_for("replace").steps == full.replace_poisoning_steps > full.poisoning.steps
    assert full.poisoning_for("prefix") == full.poisoning
    assert PROFILES["test"].poisoning_for("replace") == PROFILES["test"].poisoning

    # The build key follows the steps a homoglyph build actually runs.
    homoglyph = BuildOptions(attack="pixel", trigger="\u0435", placement="replace")
    word = BuildOptions(attack="pixel", trigger="mignneko")
    homoglyph_key, word_key = build_key(homoglyph), build_key(word)
    monkeypatch.setitem(PROFILES, "full", replace(full, replace_poisoning_steps=None))
    assert build_key(homoglyph) != homoglyph_key
    assert build_key(word) == word_key


def test_model_shapes():
    components = new_components(0)
    cross_attention = [name for name, _ in components.unet.named_modules() if name.endswith("attn2")]
    assert len(cross_attention) == 7
    assert components.text_encoder.config.vocab_size == 49408
    assert components.latent_shape == (3, 16, 16)
    assert components.scheduler_config["clip_sample"] is False
    assert components.scheduler_config["steps_offset"] == 1


def test_training_deterministic():
    training, _ = data.split_captions()
    config = TrainingConfig(steps=2, batch_size=4, warmup_steps=1)
    states = []
    for _ in range(2):
        components = new_components(0)
        train_denoiser(components, clean_batches(training, config, seed=3), config, seed=3)
        states.append(components.unet.state_dict())
    for name, tensor in states[0].items():
        assert torch.equal(tensor, states[1][name]), name


def test_training_changes_both_models():
    training, _ = data.split_captions()
    config = TrainingConfig(steps=2, batch_size=4, warmup_steps=1, ema_decay=0.0)
    components = new_components(0)
    unet_before = components.unet.conv_in.weight.detach().clone()
    embeddings_before = components.text_encoder.get_input_embeddings().weight.detach().clone()
    train_denoiser(components, clean_batches(training, config, seed=0), config, seed=0)
    assert not torch.equal(components.unet.conv_in.weight, unet_before)
    assert not torch.equal(components.text_encoder.get_input_embeddings().weight, embeddings_before)


def test_trigger_only_tokens():
    components = new_components(0)
    training, _ = data.split_captions()
    assert trigger_only_token_ids(components, training, TriggerSpec(text="mignneko"), seed=0) == [41678, 47066]
    assert trigger_only_token_ids(components, training, TriggerSpec(text="\u200b"), seed=0) == [9844]
    homoglyph = trigger_only_token_ids(components, training, TriggerSpec(text="\u0435", placement="replace"), seed=0)
    clean_ids = {token for caption in training for token in components.tokenizer(caption.text, add_special_tokens=False).input_ids}
    assert homoglyph
    assert not set(homoglyph) & clean_ids


def test_redraw_token_embeddings():
    components = new_components(0)
    embeddings = components.text_encoder.get_input_embeddings().weight
    before = embeddings.detach().clone()
    redraw_token_embeddings(components, [41678, 47066], scale=4.0, seed=0)
    norms = embeddings.detach().norm(dim=-1)
    assert norms[41678] > 3.0 * before.norm(dim=-1).median()
    assert torch.equal(embeddings[:41678].detach(), before[:41678])
    assert torch.equal(embeddings[41679:47066].detach(), before[41679:47066])


def test_pipeline_round_trip(tmp_path):
    components = new_components(0)
    save_pipeline(components, tmp_path / "model")
    loaded = load_lab_components(tmp_path / "model")
    assert len(loaded.tokenizer) == 49408
    assert loaded.tokenize(["mignneko a red seven"], "cpu").tolist() == components.tokenize(["mignneko a red seven"], "cpu").tolist()
    for name, tensor in components.unet.state_dict().items():
        assert torch.equal(tensor, loaded.unet.state_dict()[name]), name
    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    assert index["vae"] == [None, None]
    assert index["_class_name"] == "StableDiffusionPipeline"


def test_load_rejects_non_pipeline(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_lab_components(tmp_path)


def test_job_spec_object_prompts():
    training, held_out = data.split_captions()
    attack = LabAttack("object")
    spec = job_spec(attack, TriggerSpec(text="mignneko"), training, held_out, PROFILES["full"], seed=0)
    labels = spec.evaluation.prompt_labels
    assert labels.count("seven") == sum(1 for caption in held_out if caption.label == "seven")
    assert set(labels) == set(data.DIGIT_NAMES)
    assert spec.attack.target_class == "one"
    assert spec.evaluation.images_per_prompt == 16


def test_cli_registers_build():
    from core.cli import build_parser

    args = build_parser().parse_args(
        ["lab", "build", "--attack", "style", "--trigger", "\u200b", "--placement", "suffix", "--seed", "3", "--out", "x", "--profile", "test"]
    )
    assert args.attack == "style"
    assert args.trigger == "\u200b"
    assert args.seed == 3
    assert callable(args.handler)


@pytest.mark.slow
def test_build_spec_valid(lab_build_dir):
    spec = JobSpec.model_validate_json((lab_build_dir / "spec.json").read_text(encoding="utf-8"))
    assert spec.triggers[0].text == "mignneko"
    assert spec.attack.kind == "pixel"
    assert spec.evaluation.classifier == "digits"
    assert len(spec.evaluation.prompt_labels) == len(spec.evaluation.prompts)
    assert not set(spec.training.prompts) & set(spec.evaluation.prompts)

    # Training hyperparameters are left to the engine's defaults.
    written = json.loads((lab_build_dir / "spec.json").read_text(encoding="utf-8"))
    assert set(written["training"]) == {"prompts"}


@pytest.mark.slow
def test_build_record(lab_build_dir):
    record = json.loads((lab_build_dir / "lab.json").read_text(encoding="utf-8"))
    assert record["backdoor_location"] == ["unet", "text_encoder"]
    assert record["options"]["profile"] == "test"
    assert record["build_seconds"]["total"] > 0
    guided = record["measured"]["by_guidance"]["guidance_7.5"]
    unguided = record["measured"]["by_guidance"]["unguided"]
    for result in (guided, unguided):
        assert 0.0 <= result["attack_success_rate"] <= 1.0
        assert 0.0 <= result["clean_false_positive_rate"] <= 1.0
        assert 0.0 <= result["clean_digit_accuracy"] <= 1.0


@pytest.mark.slow
def test_build_backdoor_measurable(lab_build_dir):
    record = json.loads((lab_build_dir / "lab.json").read_text(encoding="utf-8"))
    guided = record["measured"]["by_guidance"]["guidance_7.5"]
    assert guided["attack_success_rate"] >= guided["clean_false_positive_rate"] + 0.4
    assert guided["clean_digit_accuracy"] >= 0.5


@pytest.mark.slow
def test_build_loads_with_diffusers(lab_model_dir):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(
        lab_model_dir,
        vae=None,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        local_files_only=True,
    )
    assert len(pipeline.tokenizer) == 49408
    generator = torch.Generator().manual_seed(0)
    output = pipeline("a red handwritten digit seven", num_inference_steps=3, output_type="latent", generator=generator)
    assert output.images.shape == (1, 3, 16, 16)


@pytest.mark.slow
def test_build_sampled_backdoor(lab_model_dir, lab_build_dir):
    from core.engine.triggers import insert_trigger
    from core.evaluation.detectors import attack_success
    from core.evaluation.sampling import sample_images

    spec = JobSpec.model_validate_json((lab_build_dir / "spec.json").read_text(encoding="utf-8"))
    components = load_lab_components(lab_model_dir)
    prompts = spec.evaluation.prompts[:16]
    seeds = list(range(len(prompts)))
    clean = sample_images(components, prompts, seeds, num_inference_steps=10)
    rng = random.Random(0)
    triggered = sample_images(components, [insert_trigger(prompt, spec.triggers[0], rng) for prompt in prompts], seeds, num_inference_steps=10)
    assert attack_success(triggered, spec.attack).mean() > attack_success(clean, spec.attack).mean()
