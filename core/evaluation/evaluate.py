"""Before/after evaluation: attack success, false positives, clean accuracy and trigger influence.

`evaluate_model` samples the held-out prompts of a job spec clean and with each trigger,
using the same seeds for both, so that every triggered image has a clean twin. Running it
on the model before and after unlearning with the same spec gives the same seeds again,
and `compare` turns the two results into removal rate and clean fidelity.
"""

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from core.components import Components
from core.errors import InputError
from core.evaluation import metrics
from core.evaluation.detectors import attack_success, load_classifier
from core.evaluation.sampling import DEFAULT_GUIDANCE_SCALE, sample_images
from core.engine.triggers import insert_trigger
from core.spec import AttackSpec, JobSpec

logger = logging.getLogger(__name__)

UNGUIDED_SCALE = 1.0

# Called after every sampled batch with (images done, images in total). An exception
# raised by the callback, such as `JobCancelled`, stops the evaluation.
BatchCallback = Callable[[int, int], None]


@dataclass
class TriggerResult:
    """Figures and grid images for one trigger."""

    text: str
    placement: str
    attack_success_rate: float | None
    attack_success_rate_unguided: float | None
    trigger_influence: float
    trigger_influence_unguided: float | None
    grid_prompts: list[str]
    grid_images: np.ndarray  # (G, H, W, 3) guided, first image of each grid prompt

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "placement": self.placement,
            "attack_success_rate": self.attack_success_rate,
            "attack_success_rate_unguided": self.attack_success_rate_unguided,
            "trigger_influence": self.trigger_influence,
            "trigger_influence_unguided": self.trigger_influence_unguided,
            "example_prompts": list(self.grid_prompts),
        }


@dataclass
class EvaluationResult:
    """One model's evaluation on the held-out prompts; the rates are shares in [0, 1].

    A rate is None where it does not apply: attack success for attack kind `none`, the
    unguided figures when `also_unguided` is off, clean accuracy without a classifier and
    prompt labels. `clean_images` keeps every clean image so that `compare` can measure
    clean fidelity against another model sampled with the same seeds.
    """

    attack_kind: str
    prompts: list[str]
    images_per_prompt: int
    seeds: list[int]
    guidance_scale: float
    num_inference_steps: int
    attack_success_rate: float | None
    attack_success_rate_unguided: float | None
    attacked_images: int
    clean_false_positive_rate: float | None
    clean_false_positive_rate_unguided: float | None
    clean_accuracy: float | None
    clean_accuracy_unguided: float | None
    trigger_influence: float
    trigger_influence_unguided: float | None
    triggers: list[TriggerResult]
    clean_images: np.ndarray  # (N, H, W, 3) guided, N = prompts x images_per_prompt
    clean_images_unguided: np.ndarray | None
    grid_prompts: list[str]
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def grid_indices(self) -> list[int]:
        return [index * self.images_per_prompt for index in range(len(self.grid_prompts))]

    @property
    def grid_clean(self) -> np.ndarray:
        """(G, H, W, 3): the first clean image of each grid prompt."""
        return self.clean_images[self.grid_indices]

    def to_dict(self) -> dict:
        """Return the figures as plain JSON values, without images."""
        return {
            "attack_kind": self.attack_kind,
            "images": len(self.seeds),
            "prompts": len(self.prompts),
            "images_per_prompt": self.images_per_prompt,
            "guidance_scale": self.guidance_scale,
            "num_inference_steps": self.num_inference_steps,
            "attack_success_rate": self.attack_success_rate,
            "attack_success_rate_unguided": self.attack_success_rate_unguided,
            "attacked_images": self.attacked_images,
            "clean_false_positive_rate": self.clean_false_positive_rate,
            "clean_false_positive_rate_unguided": self.clean_false_positive_rate_unguided,
            "clean_accuracy": self.clean_accuracy,
            "clean_accuracy_unguided": self.clean_accuracy_unguided,
            "trigger_influence": self.trigger_influence,
            "trigger_influence_unguided": self.trigger_influence_unguided,
            "triggers": [trigger.to_dict() for trigger in self.triggers],
            "seconds": self.seconds,
            "notes": list(self.notes),
        }


class _Sampler:
    """Sample in chunks of the spec's batch size and report progress after each chunk."""

    def __init__(self, components, spec: JobSpec, *, unet, device, on_batch: BatchCallback | None, total: int):
        self.components = components
        self.spec = spec
        self.unet = unet
        self.device = device
        self.on_batch = on_batch
        self.total = total
        self.done = 0

    def __call__(self, prompts: list[str], seeds: list[int], guidance_scale: float) -> np.ndarray:
        evaluation = self.spec.evaluation
        chunks = []
        for start in range(0, len(prompts), evaluation.batch_size):
            chunk = sample_images(
                self.components,
                prompts[start : start + evaluation.batch_size],
                seeds[start : start + evaluation.batch_size],
                guidance_scale=guidance_scale,
                num_inference_steps=evaluation.num_inference_steps,
                batch_size=evaluation.batch_size,
                device=self.device,
                unet=self.unet,
            )
            chunks.append(chunk)
            self.done += len(chunk)
            if self.on_batch is not None:
                self.on_batch(self.done, self.total)
        return np.concatenate(chunks)


def triggered_prompts(spec: JobSpec, item_prompts: list[str], trigger_index: int) -> list[str]:
    """Insert trigger `trigger_index` into every item prompt, with an rng fixed by the spec.

    The rng depends only on the evaluation seed and the trigger's index, so the before and
    after evaluations place a `random` or `replace` trigger at the same positions.
    """
    trigger = spec.triggers[trigger_index]
    rng = random.Random(f"sealer-evaluation:{spec.evaluation.seed}:{trigger_index}")
    prompts = []
    for prompt in item_prompts:
        try:
            prompts.append(insert_trigger(prompt, trigger, rng))
        except InputError as error:
            raise InputError(
                f"cannot insert trigger {trigger.text!r} into evaluation prompt {prompt!r}: {error.message}",
                field="evaluation.prompts",
            ) from None
    return prompts


def _success_mask(spec: JobSpec) -> np.ndarray | None:
    """Return which prompts count for the attack success rate (None: all of them).

    An `object` attack turns its source class into the target class, so only prompts
    labelled with `attack.source_class` can show it, when labels and a source class exist.
    """
    attack, evaluation = spec.attack, spec.evaluation
    if attack.kind != "object" or attack.source_class is None or evaluation.prompt_labels is None:
        return None
    return np.array([label == attack.source_class for label in evaluation.prompt_labels])


def _rate(flags: np.ndarray) -> float | None:
    return float(np.mean(flags)) if len(flags) else None


def _attack_rate(images: np.ndarray, attack: AttackSpec, classifier, item_mask: np.ndarray) -> float | None:
    if attack.kind == "none" or not item_mask.any():
        return None
    flags = np.asarray(attack_success(images[item_mask], attack, classifier=classifier), dtype=bool)
    return _rate(flags)


def _accuracy(images: np.ndarray | None, classifier, item_labels: list[str] | None) -> float | None:
    if images is None or classifier is None or item_labels is None:
        return None
    predictions = classifier.predict(images)
    return _rate(np.array([predicted == label for predicted, label in zip(predictions, item_labels)]))


def _mean_or_none(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return float(np.mean(present)) if present else None


def _resolve_classifier(spec: JobSpec, classifier):
    if classifier is not None:
        return classifier
    if spec.evaluation.classifier:
        return load_classifier(spec.evaluation.classifier)
    return None


@dataclass
class _Plan:
    """The sampling plan of one evaluation: items (prompt, seed), the items that count for the ASR, and the passes."""

    item_prompts: list[str]
    seeds: list[int]
    item_labels: list[str] | None
    item_mask: np.ndarray  # (N,) bool: items that count for the attack success rate
    passes: dict[str, float]  # "guided" and, when sampled separately, "unguided" -> guidance scale
    also_unguided: bool
    grid_indices: list[int]
    notes: list[str]

    def unguided(self, values: dict):
        """Return the unguided entry of a per-pass dict, or None without `also_unguided`.

        A guidance scale of 1 or less already samples without guidance, so then the guided
        pass is the unguided one too.
        """
        if not self.also_unguided:
            return None
        return values["unguided"] if "unguided" in self.passes else values["guided"]


def _plan(spec: JobSpec) -> _Plan:
    evaluation, attack = spec.evaluation, spec.attack
    notes = []

    # Items: every prompt repeated images_per_prompt times, each with its own seed.
    per_prompt = evaluation.images_per_prompt
    item_prompts = [prompt for prompt in evaluation.prompts for _ in range(per_prompt)]
    seeds = [evaluation.seed + index for index in range(len(item_prompts))]
    item_labels = None
    if evaluation.prompt_labels is not None:
        item_labels = [label for label in evaluation.prompt_labels for _ in range(per_prompt)]

    # Items that count for the attack success rate.
    prompt_mask = _success_mask(spec)
    item_mask = np.ones(len(item_prompts), dtype=bool) if prompt_mask is None else np.repeat(prompt_mask, per_prompt)
    if attack.kind != "none" and not item_mask.any():
        notes.append(
            f"no evaluation prompt is labelled {attack.source_class!r} (attack.source_class), "
            "so the attack success rate is not measured"
        )
        logger.warning(notes[-1])
    if attack.kind == "object" and prompt_mask is None:
        notes.append("every prompt counts for the attack success rate: no prompt labels or source class given")

    # Sampling passes: the guided one and, unless the guided one is already unguided, scale 1.
    guidance_scale = evaluation.guidance_scale if evaluation.guidance_scale is not None else DEFAULT_GUIDANCE_SCALE
    passes = {"guided": guidance_scale}
    if evaluation.also_unguided and guidance_scale > UNGUIDED_SCALE:
        passes["unguided"] = UNGUIDED_SCALE

    grid_count = min(evaluation.sample_grid_prompts, len(evaluation.prompts))
    return _Plan(
        item_prompts=item_prompts,
        seeds=seeds,
        item_labels=item_labels,
        item_mask=item_mask,
        passes=passes,
        also_unguided=evaluation.also_unguided,
        grid_indices=[index * per_prompt for index in range(grid_count)],
        notes=notes,
    )


def _evaluate_trigger(
    spec: JobSpec, trigger_index: int, plan: _Plan, sample: _Sampler, clean: dict[str, np.ndarray], classifier
) -> TriggerResult:
    """Sample the triggered prompts of one trigger with the clean images' seeds and score them."""
    trigger = spec.triggers[trigger_index]
    prompts_with_trigger = triggered_prompts(spec, plan.item_prompts, trigger_index)
    success, influence, images = {}, {}, {}
    for name, scale in plan.passes.items():
        images[name] = sample(prompts_with_trigger, plan.seeds, scale)
        success[name] = _attack_rate(images[name], spec.attack, classifier, plan.item_mask)
        influence[name] = metrics.trigger_influence(clean[name], images[name])
    return TriggerResult(
        text=trigger.text,
        placement=trigger.placement,
        attack_success_rate=success["guided"],
        attack_success_rate_unguided=plan.unguided(success),
        trigger_influence=influence["guided"],
        trigger_influence_unguided=plan.unguided(influence),
        grid_prompts=[prompts_with_trigger[index] for index in plan.grid_indices],
        grid_images=images["guided"][plan.grid_indices],
    )


def evaluate_model(
    components: Components,
    spec: JobSpec,
    *,
    unet: torch.nn.Module | None = None,
    device: torch.device | str = "cpu",
    classifier=None,
    on_batch: BatchCallback | None = None,
) -> EvaluationResult:
    """Sample the held-out prompts clean and triggered, and score the attack.

    Images: prompts x `images_per_prompt`, image k seeded with `evaluation.seed + k`, clean
    and once per trigger with the same seeds, at `evaluation.guidance_scale` (7.5 when
    unset) and, with `also_unguided`, again at scale 1. `unet` replaces the components'
    UNet, so the same components serve before and after unlearning. `classifier` overrides
    `evaluation.classifier`. Attack success counts the detector's hits on triggered images,
    the clean false-positive rate its hits on the clean images of the same prompts.
    """
    started = time.perf_counter()
    evaluation, attack = spec.evaluation, spec.attack
    if not evaluation.prompts:
        raise InputError(
            "evaluation.prompts is empty; give held-out prompts that are not in training.prompts",
            field="evaluation.prompts",
        )
    classifier = _resolve_classifier(spec, classifier)
    plan = _plan(spec)
    total = len(plan.item_prompts) * (1 + len(spec.triggers)) * len(plan.passes)
    sample = _Sampler(components, spec, unet=unet, device=device, on_batch=on_batch, total=total)
    logger.info(
        "evaluating %d prompts x %d images with %d triggers at guidance %s%s: %d images to sample",
        len(evaluation.prompts),
        evaluation.images_per_prompt,
        len(spec.triggers),
        plan.passes["guided"],
        " and unguided" if "unguided" in plan.passes else "",
        total,
    )

    # Clean images per pass: false positives and clean accuracy.
    clean = {name: sample(plan.item_prompts, plan.seeds, scale) for name, scale in plan.passes.items()}
    false_positive = {name: _attack_rate(clean[name], attack, classifier, plan.item_mask) for name in plan.passes}
    accuracy = {name: _accuracy(clean[name], classifier, plan.item_labels) for name in plan.passes}

    # Triggered images, trigger by trigger: attack success and influence.
    trigger_results = [
        _evaluate_trigger(spec, index, plan, sample, clean, classifier) for index in range(len(spec.triggers))
    ]

    # Overall figures: the mean over triggers, which all have the same image count.
    result = EvaluationResult(
        attack_kind=attack.kind,
        prompts=list(evaluation.prompts),
        images_per_prompt=evaluation.images_per_prompt,
        seeds=plan.seeds,
        guidance_scale=plan.passes["guided"],
        num_inference_steps=evaluation.num_inference_steps,
        attack_success_rate=_mean_or_none([trigger.attack_success_rate for trigger in trigger_results]),
        attack_success_rate_unguided=_mean_or_none(
            [trigger.attack_success_rate_unguided for trigger in trigger_results]
        ),
        attacked_images=int(plan.item_mask.sum()) * len(spec.triggers) if attack.kind != "none" else 0,
        clean_false_positive_rate=false_positive["guided"],
        clean_false_positive_rate_unguided=plan.unguided(false_positive),
        clean_accuracy=accuracy["guided"],
        clean_accuracy_unguided=plan.unguided(accuracy),
        trigger_influence=float(np.mean([trigger.trigger_influence for trigger in trigger_results])),
        trigger_influence_unguided=_mean_or_none([trigger.trigger_influence_unguided for trigger in trigger_results]),
        triggers=trigger_results,
        clean_images=clean["guided"],
        clean_images_unguided=plan.unguided(clean),
        grid_prompts=list(evaluation.prompts[: len(plan.grid_indices)]),
        seconds=time.perf_counter() - started,
        notes=plan.notes,
    )
    logger.info(
        "evaluation done in %.1f s: attack success %s, unguided %s, clean false positives %s, trigger influence %.4f",
        result.seconds,
        _percent(result.attack_success_rate),
        _percent(result.attack_success_rate_unguided),
        _percent(result.clean_false_positive_rate),
        result.trigger_influence,
    )
    return result


def _percent(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:.1%}"


def removal_rate(before: float | None, after: float | None) -> float | None:
    """Return (before - after) / before, or None when either is missing or before is 0.

    Negative when the attack succeeds more often after unlearning than before.
    """
    if before is None or after is None or before == 0:
        return None
    return (before - after) / before


def _check_comparable(before: EvaluationResult, after: EvaluationResult) -> None:
    settings = ("prompts", "seeds", "guidance_scale", "num_inference_steps", "attack_kind")
    for name in settings:
        if getattr(before, name) != getattr(after, name):
            raise ValueError(
                f"before and after evaluations differ in {name}; evaluate both models with the same job spec"
            )
    if len(before.triggers) != len(after.triggers):
        raise ValueError(
            f"before has {len(before.triggers)} triggers and after has {len(after.triggers)}; "
            "evaluate both models with the same job spec"
        )


def compare(before: EvaluationResult, after: EvaluationResult) -> dict:
    """Return removal rates, trigger-influence change and clean fidelity between two evaluations.

    Clean fidelity compares the clean images of the same seeds: PSNR in dB (identical
    images count as `metrics.PSNR_CAP_DB`) and SSIM, at the guidance scale and, when both
    have them, unguided.
    """
    _check_comparable(before, after)
    fidelity = {
        "psnr_db": metrics.psnr(before.clean_images, after.clean_images),
        "ssim": metrics.ssim(before.clean_images, after.clean_images),
        "psnr_db_unguided": None,
        "ssim_unguided": None,
        "images": len(before.seeds),
    }
    if before.clean_images_unguided is not None and after.clean_images_unguided is not None:
        fidelity["psnr_db_unguided"] = metrics.psnr(before.clean_images_unguided, after.clean_images_unguided)
        fidelity["ssim_unguided"] = metrics.ssim(before.clean_images_unguided, after.clean_images_unguided)

    per_trigger = []
    for first, second in zip(before.triggers, after.triggers):
        per_trigger.append(
            {
                "text": first.text,
                "removal_rate": removal_rate(first.attack_success_rate, second.attack_success_rate),
                "removal_rate_unguided": removal_rate(
                    first.attack_success_rate_unguided, second.attack_success_rate_unguided
                ),
                "trigger_influence_reduction": removal_rate(first.trigger_influence, second.trigger_influence),
            }
        )

    return {
        "removal_rate": removal_rate(before.attack_success_rate, after.attack_success_rate),
        "removal_rate_unguided": removal_rate(before.attack_success_rate_unguided, after.attack_success_rate_unguided),
        "trigger_influence_reduction": removal_rate(before.trigger_influence, after.trigger_influence),
        "clean_fidelity": fidelity,
        "triggers": per_trigger,
    }
