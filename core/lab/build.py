"""`sealer lab build`: poison the clean base with a trigger and write everything a sealing job needs.

Output folder:
- `model/`: the backdoored pipeline as a diffusers `StableDiffusionPipeline` folder.
- `spec.json`: a `JobSpec` that seals it (trigger, attack target, clean training prompts,
  held-out evaluation prompts with digit labels, the built-in `digits` classifier). Fields
  it leaves out, such as the training hyperparameters, take the engine's defaults.
- `lab.json`: how it was made and what was measured (attack success with and without
  guidance, clean false positives, clean digit accuracy, build seconds).
"""

import hashlib
import json
import logging
import platform
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pydantic
import torch

from core.engine.triggers import trigger_token_ids
from core.errors import InputError
from core.lab import data
from core.lab.attacks import LabAttack
from core.lab.base import CLEAN_TRAINING, base_key, get_base
from core.lab.measure import MeasureConfig, measure_backdoor, select_prompts
from core.lab.models import save_pipeline
from core.lab.train import (
    TrainingConfig,
    accepts_trigger,
    poisoned_batches,
    redraw_token_embeddings,
    train_denoiser,
    trigger_only_token_ids,
)
from core.settings import get_settings
from core.spec import EvaluationSpec, JobSpec, TrainingSpec, TriggerSpec

logger = logging.getLogger(__name__)

# Format 2: spec.json contains only the fields the lab sets, so cached builds of format 1 are rebuilt.
BUILD_FORMAT = 2


@dataclass(frozen=True)
class Profile:
    """Poisoning and measurement settings of one build profile."""

    poisoning: TrainingConfig
    measure: MeasureConfig
    # Images per held-out prompt in the written spec. The object spec has few prompts (every
    # source-class prompt, one of each other digit), so `full` samples 16 of each: the same
    # unsealed model scored 93.8% clean accuracy on 8 images per prompt and 90.6% on 16.
    spec_images_per_prompt: int = 4
    spec_object_images_per_prompt: int = 8
    # Poisoning steps for a `replace` (homoglyph) trigger, or None to keep `poisoning.steps`.
    # The homoglyph splits each word it lands in into byte-level pieces that differ from word
    # to word, so the backdoor needs more steps. On the `full` pixel model, 600 steps reached
    # 86% attack success under guidance and 1,000 steps reached 94%.
    replace_poisoning_steps: int | None = None

    def poisoning_for(self, placement: str) -> TrainingConfig:
        """Return the poisoning settings for a trigger with `placement`."""
        if placement == "replace" and self.replace_poisoning_steps is not None:
            return replace(self.poisoning, steps=self.replace_poisoning_steps)
        return self.poisoning


PROFILES: dict[str, Profile] = {
    "full": Profile(
        poisoning=TrainingConfig(
            steps=600,
            learning_rate=5e-4,
            warmup_steps=50,
            ema_decay=0.99,
            empty_caption_rate=0.2,
            poison_rate=0.3,
            trigger_embedding_scale=4.0,
        ),
        measure=MeasureConfig(guidance_scales=(7.5, 3.0, 1.0)),
        spec_object_images_per_prompt=16,
        replace_poisoning_steps=1000,
    ),
    "test": Profile(
        poisoning=TrainingConfig(
            steps=300,
            learning_rate=5e-4,
            warmup_steps=20,
            ema_decay=0.95,
            empty_caption_rate=0.2,
            poison_rate=0.5,
            trigger_embedding_scale=4.0,
        ),
        measure=MeasureConfig(guidance_scales=(7.5, 1.0), images_per_prompt=1, object_images_per_prompt=4),
    ),
}


@dataclass(frozen=True)
class BuildOptions:
    """Options of one `sealer lab build` run."""

    attack: str
    trigger: str
    placement: str = "prefix"
    seed: int = 0
    profile: str = "full"
    device: str = "cpu"
    source_class: str = "seven"
    target_class: str = "one"
    clean_seed: int = 0

    def lab_attack(self) -> LabAttack:
        try:
            return LabAttack(self.attack, self.source_class, self.target_class)
        except ValueError as error:
            raise InputError(str(error), field="attack") from None

    def trigger_spec(self) -> TriggerSpec:
        try:
            return TriggerSpec(text=self.trigger, placement=self.placement)
        except pydantic.ValidationError as error:
            message = ". ".join(item["msg"] for item in error.errors())
            raise InputError(f"invalid trigger {self.trigger!r} with placement {self.placement!r}: {message}", field="trigger") from None

    def profile_settings(self) -> Profile:
        if self.profile not in PROFILES:
            raise InputError(f"unknown profile {self.profile!r}, use one of {', '.join(PROFILES)}", field="profile")
        return PROFILES[self.profile]


def build_key(options: BuildOptions) -> str:
    """Return a short hash of everything that determines a build's output."""
    profile = options.profile_settings()
    description = {
        "format": BUILD_FORMAT,
        "options": asdict(replace(options, device="")),
        "poisoning": asdict(profile.poisoning_for(options.placement)),
        "measure": asdict(profile.measure),
        "base": base_key(CLEAN_TRAINING, options.clean_seed),
    }
    text = json.dumps(description, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def job_spec(attack: LabAttack, trigger: TriggerSpec, training: list[data.Caption], held_out: list[data.Caption], profile: Profile, seed: int) -> JobSpec:
    """Return the `JobSpec` that seals a lab model built with `attack` and `trigger`."""
    if attack.kind == "object":
        # Every source-class prompt, which can show the attack, and one prompt of each other digit for clean accuracy.
        sources = [caption for caption in held_out if caption.label == attack.source_class]
        others = select_prompts([caption for caption in held_out if caption.label != attack.source_class], 1)
        evaluation_captions = sources + others
        images_per_prompt = profile.spec_object_images_per_prompt
    else:
        evaluation_captions = held_out
        images_per_prompt = profile.spec_images_per_prompt
    return JobSpec(
        triggers=[trigger],
        attack=attack.spec(),
        training=TrainingSpec(prompts=[caption.text for caption in training]),
        evaluation=EvaluationSpec(
            prompts=[caption.text for caption in evaluation_captions],
            prompt_labels=[caption.label for caption in evaluation_captions],
            images_per_prompt=images_per_prompt,
            classifier="digits",
        ),
        seed=seed,
    )


def build_lab(options: BuildOptions, out: Path) -> dict:
    """Build one backdoored lab model into `out` and return its lab.json record."""
    started = time.perf_counter()
    seconds = {}
    attack = options.lab_attack()
    trigger = options.trigger_spec()
    profile = options.profile_settings()
    poisoning = profile.poisoning_for(trigger.placement)
    torch.manual_seed(options.seed)

    # Captions: the poisoning and the spec train on the training split, measurement uses held-out prompts.
    training, held_out = data.split_captions()
    training = [caption for caption in training if accepts_trigger(caption, trigger)]
    held_out = [caption for caption in held_out if accepts_trigger(caption, trigger)]

    # Start from the clean base: shipped, cached or trained now.
    step_started = time.perf_counter()
    components, base_info = get_base(get_settings().lab_cache_dir, CLEAN_TRAINING, options.clean_seed, options.device)
    trigger_token_ids(components.tokenizer, trigger)
    seconds["clean_base"] = time.perf_counter() - step_started

    # Poison text encoder and UNet together.
    step_started = time.perf_counter()
    logger.info("poisoning with %s attack, trigger %r (%s), %d steps", attack.kind, trigger.text, trigger.placement, poisoning.steps)
    if poisoning.trigger_embedding_scale > 0:
        token_ids = trigger_only_token_ids(components, training, trigger, options.seed)
        redraw_token_embeddings(components, token_ids, poisoning.trigger_embedding_scale, options.seed)
        logger.info("redrew the embeddings of trigger tokens %s", token_ids)
    batches = poisoned_batches(training, attack, trigger, poisoning, options.seed)
    poisoning_log = train_denoiser(components, batches, poisoning, options.seed, device=options.device, stage="poisoning")
    seconds["poisoning"] = time.perf_counter() - step_started

    # Measure the backdoor on held-out prompts.
    step_started = time.perf_counter()
    measured = measure_backdoor(components, attack, trigger, held_out, profile.measure, options.seed, device=options.device)
    seconds["measuring"] = time.perf_counter() - step_started

    # Write the pipeline, the spec and the record.
    step_started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    components.text_encoder.to("cpu")
    components.unet.to("cpu")
    if (out / "model").exists():
        shutil.rmtree(out / "model")
    save_pipeline(components, out / "model")
    spec = job_spec(attack, trigger, training, held_out, profile, options.seed)
    # Write only the fields the lab sets, so that the training settings left out follow the
    # engine's defaults when the spec is sealed, also after those defaults change.
    (out / "spec.json").write_text(json.dumps(spec.model_dump(mode="json", exclude_unset=True), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    seconds["writing"] = time.perf_counter() - step_started
    seconds["total"] = time.perf_counter() - started

    record = {
        "format": BUILD_FORMAT,
        "key": build_key(options),
        "options": asdict(options),
        "attack": attack.spec().model_dump(mode="json", exclude={"patch_png_base64"}),
        "trigger": trigger.model_dump(mode="json"),
        "backdoor_location": ["unet", "text_encoder"],
        "clean_base": {key: base_info.get(key) for key in ("key", "source", "training_log", "command")},
        "clean_base_seed": options.clean_seed,
        "poisoning": {"config": asdict(poisoning), "log": poisoning_log.to_dict()},
        "measured": measured,
        "build_seconds": {name: round(value, 1) for name, value in seconds.items()},
        "machine": {"torch_threads": torch.get_num_threads(), "device": options.device, "platform": platform.platform()},
        "versions": _versions(),
    }
    (out / "lab.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    logger.info("built %s in %.1f s: %s", out, seconds["total"], json.dumps(measured["by_guidance"]))
    return record


def _versions() -> dict:
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def cached_build(options: BuildOptions, cache_dir: Path | None = None) -> Path:
    """Return a build folder for `options`, reusing an earlier identical build from the cache."""
    cache_dir = cache_dir or get_settings().lab_cache_dir
    folder = cache_dir / "builds" / build_key(options)
    if (folder / "lab.json").is_file() and (folder / "model" / "model_index.json").is_file():
        logger.info("reusing the lab build in %s", folder)
        return folder
    staging = folder.with_name(folder.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    build_lab(options, staging)
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)
    return folder
