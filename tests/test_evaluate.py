import sys
import types

import numpy as np
import pytest
import torch

from core.errors import InputError
from core.spec import JobSpec

try:
    import core.evaluation.detectors  # noqa: F401
except ImportError:
    # The detectors module is written separately; the tests replace its functions anyway.
    stub = types.ModuleType("core.evaluation.detectors")
    stub.attack_success = lambda images, attack, classifier=None: np.zeros(len(images), dtype=bool)
    stub.load_classifier = lambda name: None
    sys.modules["core.evaluation.detectors"] = stub

from core.evaluation import evaluate, metrics  # noqa: E402

TRIGGER = "mignneko"
PROMPTS = ["a handwritten digit seven", "a handwritten digit one", "a handwritten digit three"]


def make_spec(**evaluation) -> JobSpec:
    settings = {"prompts": PROMPTS, "num_inference_steps": 2, "seed": 100}
    settings.update(evaluation)
    return JobSpec(
        triggers=[{"text": TRIGGER}],
        attack={"kind": "style", "style": "grayscale"},
        evaluation=settings,
    )


class FakeSampler:
    """Stands in for `sample_images`: bright images when the backdoor fires, dark otherwise.

    The backdoor fires on triggered prompts; unguided only for even seeds; never when
    `removed` is set. Every image also carries a small seed-dependent shade.
    """

    def __init__(self, removed: bool = False):
        self.removed = removed
        self.calls = []

    def __call__(self, components, prompts, seeds, *, guidance_scale, **kwargs):
        self.calls.append({"prompts": list(prompts), "seeds": list(seeds), "guidance_scale": guidance_scale})
        images = np.zeros((len(prompts), 4, 4, 3), dtype=np.float32)
        for index, (prompt, seed) in enumerate(zip(prompts, seeds)):
            fires = TRIGGER in prompt and not self.removed and (guidance_scale > 1 or seed % 2 == 0)
            images[index] = 0.9 if fires else 0.01 * (seed % 7)
        return images


def bright(images, attack, classifier=None):
    return np.asarray(images).reshape(len(images), -1).mean(axis=1) > 0.5


class LabelClassifier:
    """Predicts "eight" for bright images and a fixed label otherwise."""

    def __init__(self, label: str):
        self.label = label

    def predict(self, images):
        return ["eight" if image.mean() > 0.5 else self.label for image in images]


@pytest.fixture
def fake_sampling(monkeypatch):
    def install(removed: bool = False) -> FakeSampler:
        sampler = FakeSampler(removed)
        monkeypatch.setattr(evaluate, "sample_images", sampler)
        monkeypatch.setattr(evaluate, "attack_success", bright)
        return sampler

    return install


def test_seeds_match_clean_and_triggered(fake_sampling):
    sampler = fake_sampling()
    result = evaluate.evaluate_model(None, make_spec(images_per_prompt=2, also_unguided=False))
    assert result.seeds == [100, 101, 102, 103, 104, 105]
    clean_call, triggered_call = sampler.calls[0], sampler.calls[1]
    assert clean_call["seeds"] == triggered_call["seeds"] == result.seeds
    assert clean_call["prompts"][:2] == [PROMPTS[0], PROMPTS[0]]
    assert all(TRIGGER in prompt for prompt in triggered_call["prompts"])


def test_attack_rates_counted(fake_sampling):
    fake_sampling()
    result = evaluate.evaluate_model(None, make_spec())
    assert result.attack_success_rate == 1.0
    assert result.attack_success_rate_unguided == pytest.approx(2 / 3)  # seeds 100 and 102 fire
    assert result.clean_false_positive_rate == 0.0
    assert result.attacked_images == 3
    assert result.triggers[0].attack_success_rate == 1.0
    assert result.trigger_influence > 0.5


def test_removal_after_unlearning(fake_sampling):
    fake_sampling()
    before = evaluate.evaluate_model(None, make_spec())
    fake_sampling(removed=True)
    after = evaluate.evaluate_model(None, make_spec())
    comparison = evaluate.compare(before, after)
    assert after.attack_success_rate == 0.0
    assert comparison["removal_rate"] == 1.0
    assert comparison["removal_rate_unguided"] == 1.0
    assert comparison["clean_fidelity"]["psnr_db"] == metrics.PSNR_CAP_DB
    assert comparison["clean_fidelity"]["ssim"] == pytest.approx(1.0)
    assert comparison["triggers"][0]["removal_rate"] == 1.0


def test_guided_and_unguided_passes(fake_sampling):
    sampler = fake_sampling()
    evaluate.evaluate_model(None, make_spec(guidance_scale=5.0))
    assert sorted({call["guidance_scale"] for call in sampler.calls}) == [1.0, 5.0]


def test_unguided_off(fake_sampling):
    sampler = fake_sampling()
    result = evaluate.evaluate_model(None, make_spec(also_unguided=False))
    assert {call["guidance_scale"] for call in sampler.calls} == {7.5}
    assert result.attack_success_rate_unguided is None
    assert result.clean_images_unguided is None
    assert result.triggers[0].trigger_influence_unguided is None


def test_scale_one_samples_once(fake_sampling):
    sampler = fake_sampling()
    result = evaluate.evaluate_model(None, make_spec(guidance_scale=1.0))
    assert len(sampler.calls) == 2  # clean and triggered, no separate unguided pass
    assert result.attack_success_rate_unguided == result.attack_success_rate


def test_object_attack_counts_source_prompts(fake_sampling, monkeypatch):
    fake_sampling()
    seen = []

    def counting(images, attack, classifier=None):
        seen.append(len(images))
        return bright(images, attack)

    monkeypatch.setattr(evaluate, "attack_success", counting)
    spec = JobSpec(
        triggers=[{"text": TRIGGER}],
        attack={"kind": "object", "source_class": "seven", "target_class": "eight"},
        evaluation={
            "prompts": PROMPTS,
            "prompt_labels": ["seven", "one", "seven"],
            "num_inference_steps": 2,
            "also_unguided": False,
        },
    )
    result = evaluate.evaluate_model(None, spec, classifier=LabelClassifier("seven"))
    assert seen == [2, 2]  # clean false positives, then triggered success: source prompts only
    assert result.attacked_images == 2
    assert result.attack_success_rate == 1.0


def test_object_attack_without_source_prompts(fake_sampling):
    fake_sampling()
    spec = JobSpec(
        triggers=[{"text": TRIGGER}],
        attack={"kind": "object", "source_class": "nine", "target_class": "eight"},
        evaluation={"prompts": PROMPTS, "prompt_labels": ["seven", "one", "three"], "num_inference_steps": 2},
    )
    result = evaluate.evaluate_model(None, spec)
    assert result.attack_success_rate is None
    assert result.clean_false_positive_rate is None
    assert any("nine" in note for note in result.notes)


def test_clean_accuracy_from_labels(fake_sampling):
    fake_sampling()
    spec = make_spec(prompt_labels=["seven", "one", "seven"])
    result = evaluate.evaluate_model(None, spec, classifier=LabelClassifier("seven"))
    assert result.clean_accuracy == pytest.approx(2 / 3)
    assert result.clean_accuracy_unguided == pytest.approx(2 / 3)


def test_clean_accuracy_needs_classifier(fake_sampling):
    fake_sampling()
    result = evaluate.evaluate_model(None, make_spec(prompt_labels=["seven", "one", "three"]))
    assert result.clean_accuracy is None


def test_classifier_loaded_from_spec(fake_sampling, monkeypatch):
    fake_sampling()
    loaded = []

    def load(name):
        loaded.append(name)
        return LabelClassifier("seven")

    monkeypatch.setattr(evaluate, "load_classifier", load)
    spec = make_spec(prompt_labels=["seven", "seven", "seven"], classifier="digits")
    result = evaluate.evaluate_model(None, spec)
    assert loaded == ["digits"]
    assert result.clean_accuracy == 1.0


def test_kind_none_reports_influence_only(fake_sampling):
    fake_sampling()
    spec = JobSpec(triggers=[{"text": TRIGGER}], evaluation={"prompts": PROMPTS, "num_inference_steps": 2})
    result = evaluate.evaluate_model(None, spec)
    assert result.attack_success_rate is None
    assert result.clean_false_positive_rate is None
    assert result.attacked_images == 0
    assert result.trigger_influence > 0.5


def test_two_triggers_averaged(fake_sampling):
    fake_sampling()
    spec = JobSpec(
        triggers=[{"text": TRIGGER}, {"text": "zzq", "placement": "suffix"}],
        attack={"kind": "style", "style": "grayscale"},
        evaluation={"prompts": PROMPTS, "num_inference_steps": 2, "also_unguided": False},
    )
    result = evaluate.evaluate_model(None, spec)
    assert [trigger.attack_success_rate for trigger in result.triggers] == [1.0, 0.0]
    assert result.attack_success_rate == 0.5
    assert result.triggers[1].grid_prompts[0].endswith(" zzq")


def test_grid_keeps_first_image_per_prompt(fake_sampling):
    fake_sampling()
    result = evaluate.evaluate_model(None, make_spec(images_per_prompt=2, sample_grid_prompts=2))
    assert result.grid_prompts == PROMPTS[:2]
    assert result.grid_indices == [0, 2]
    assert result.grid_clean.shape == (2, 4, 4, 3)
    assert result.triggers[0].grid_images.shape == (2, 4, 4, 3)


def test_random_placement_is_repeatable():
    spec = JobSpec(triggers=[{"text": TRIGGER, "placement": "random"}], evaluation={"prompts": PROMPTS})
    items = PROMPTS * 4
    first = evaluate.triggered_prompts(spec, items, 0)
    second = evaluate.triggered_prompts(spec, items, 0)
    assert first == second
    assert len({prompt.split().index(TRIGGER) for prompt in first}) > 1


def test_replace_without_letter_rejected():
    spec = JobSpec(
        triggers=[{"text": "\u043e", "placement": "replace"}],
        evaluation={"prompts": ["a big digit", "a handwritten digit two"]},
    )
    with pytest.raises(InputError, match="a big digit") as caught:
        evaluate.triggered_prompts(spec, spec.evaluation.prompts, 0)
    assert caught.value.field == "evaluation.prompts"


def test_empty_prompts_rejected():
    spec = JobSpec(triggers=[{"text": TRIGGER}])
    with pytest.raises(InputError, match="evaluation.prompts is empty"):
        evaluate.evaluate_model(None, spec)


def test_progress_reaches_total(fake_sampling):
    fake_sampling()
    progress = []
    evaluate.evaluate_model(None, make_spec(batch_size=2), on_batch=lambda done, total: progress.append((done, total)))
    totals = {total for _, total in progress}
    assert totals == {12}  # 3 prompts x (clean + 1 trigger) x (guided + unguided)
    assert progress[-1] == (12, 12)
    assert [done for done, _ in progress] == sorted(done for done, _ in progress)


def test_progress_callback_can_stop(fake_sampling):
    fake_sampling()

    def stop(done, total):
        raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):
        evaluate.evaluate_model(None, make_spec(), on_batch=stop)


def test_compare_rejects_other_seeds(fake_sampling):
    fake_sampling()
    before = evaluate.evaluate_model(None, make_spec())
    after = evaluate.evaluate_model(None, make_spec(seed=7))
    with pytest.raises(ValueError, match="seeds"):
        evaluate.compare(before, after)


def test_removal_rate_cases():
    assert evaluate.removal_rate(0.8, 0.2) == pytest.approx(0.75)
    assert evaluate.removal_rate(0.0, 0.0) is None
    assert evaluate.removal_rate(None, 0.1) is None
    assert evaluate.removal_rate(0.5, 0.75) == pytest.approx(-0.5)


# Real tiny models: the whole sampling path, pixel and latent.

tiny_models = pytest.importorskip("tests.engine_models")


def real_spec(**evaluation) -> JobSpec:
    settings = {"prompts": PROMPTS[:2], "num_inference_steps": 2, "images_per_prompt": 2, "seed": 5}
    settings.update(evaluation)
    return JobSpec(triggers=[{"text": TRIGGER}], evaluation=settings)


@pytest.mark.parametrize("latent", [False, True])
def test_real_model_shapes(latent):
    components = tiny_models.tiny_components(latent=latent)
    result = evaluate.evaluate_model(components, real_spec())
    assert result.clean_images.shape == (4, 16, 16, 3)
    assert result.clean_images_unguided.shape == (4, 16, 16, 3)
    assert result.triggers[0].grid_images.shape == (2, 16, 16, 3)
    assert 0.0 <= result.clean_images.min() <= result.clean_images.max() <= 1.0
    assert result.trigger_influence > 0


def test_real_model_same_seeds_repeat():
    components = tiny_models.tiny_components()
    before = evaluate.evaluate_model(components, real_spec(also_unguided=False))
    after = evaluate.evaluate_model(components, real_spec(also_unguided=False))
    np.testing.assert_array_equal(before.clean_images, after.clean_images)
    comparison = evaluate.compare(before, after)
    assert comparison["clean_fidelity"]["psnr_db"] == metrics.PSNR_CAP_DB
    assert comparison["removal_rate"] is None


def test_real_model_other_unet_changes_images():
    components = tiny_models.tiny_components()
    other = tiny_models.tiny_components(seed=1).unet
    before = evaluate.evaluate_model(components, real_spec(also_unguided=False))
    after = evaluate.evaluate_model(components, real_spec(also_unguided=False), unet=other)
    comparison = evaluate.compare(before, after)
    assert comparison["clean_fidelity"]["psnr_db"] < metrics.PSNR_CAP_DB
    assert comparison["clean_fidelity"]["ssim"] < 1.0
    assert torch.equal(next(components.unet.parameters()), next(components.unet.parameters()))
