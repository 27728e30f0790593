"""The job spec: what to remove, how, and how to prove it.

One pydantic model serves as the CLI's spec file, the API's request schema and the copy
stored in every report. Unknown fields are rejected, not ignored, so a typo never turns
into a silent default. This module must not import torch.
"""

import base64
import binascii
import io
import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_TRIGGERS = 8
MAX_TRIGGER_CHARS = 64
MAX_PROMPT_CHARS = 300
# Seeds reach torch.Generator.manual_seed (at most 2**64 - 1) after the engine mixes in
# the step number, so they stay within 32 bits.
MAX_SEED = 2**32 - 1
MAX_LORA_RANK = 256
# lora_alpha / lora_rank multiplies every adapter update, so a larger alpha is taken as a typo.
MAX_LORA_ALPHA = 4096.0
# Default training: LoRA adapters of rank 4 at 3e-3. On the lab's style model they removed
# the backdoor and kept clean accuracy, which full fine-tuning did not at any learning rate
# tried (docs/benchmarks.md, "Lab sealing runs"). Full fine-tuning keeps its own default rate.
DEFAULT_LORA_RANK = 4
LORA_LEARNING_RATE = 3e-3
FULL_LEARNING_RATE = 1e-4

# Default engine steps, and fewer for style attacks when `training.steps` is unset. On the
# lab models, 150 steps left 2.5% attack success on the zero-width pixel model and cost 9
# points of clean accuracy on the object model. 300 steps removed both within the bar, but
# on the style model they cost 5 points that 150 did not (docs/benchmarks.md, "Lab sealing
# runs").
DEFAULT_STEPS = 300
STYLE_ATTACK_STEPS = 150

# The characters with the Unicode White_Space property. CLIP's tokenizer collapses and
# strips them, so a trigger made only of them encodes to 0 tokens; tests check this set
# against the tokenizer.
UNICODE_WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)

Placement = Literal["prefix", "suffix", "random", "replace"]
AttackKind = Literal["pixel", "style", "object", "none"]
Method = Literal["skd-cag", "skd", "finetune-reversal"]
NeutralTarget = Literal["noise", "zeros", "random_words"]

# Homoglyphs that look like a Latin lower-case letter, for the `replace` placement.
HOMOGLYPHS: dict[str, str] = {
    "\u0430": "a",  # Cyrillic a
    "\u0435": "e",  # Cyrillic ie
    "\u043e": "o",  # Cyrillic o
    "\u0440": "p",  # Cyrillic er
    "\u0441": "c",  # Cyrillic es
    "\u0445": "x",  # Cyrillic ha
    "\u0443": "y",  # Cyrillic u
    "\u0456": "i",  # Cyrillic byelorussian-ukrainian i
    "\u03bf": "o",  # Greek omicron
    "\u03b1": "a",  # Greek alpha
}


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TriggerSpec(StrictModel):
    """One trigger string and where it goes in a prompt."""

    text: Annotated[str, Field(min_length=1, max_length=MAX_TRIGGER_CHARS)]
    placement: Placement = "prefix"
    replaces: Annotated[str | None, Field(min_length=1, max_length=1)] = Field(
        default=None,
        description="Latin letter that the homoglyph replaces (placement `replace` only); "
        "guessed from a built-in table when omitted.",
    )

    @field_validator("text")
    @classmethod
    def _check_visible(cls, text: str) -> str:
        # The API has no tokenizer; the worker checks the real token count before training.
        if all(character in UNICODE_WHITESPACE for character in text):
            raise ValueError(
                f"trigger {text!r} is only whitespace, which the CLIP tokenizer drops, so it encodes to 0 tokens; "
                "give the trigger's visible text"
            )
        return text

    @model_validator(mode="after")
    def _check_replace(self) -> "TriggerSpec":
        if self.placement != "replace":
            if self.replaces is not None:
                raise ValueError("`replaces` applies only to placement `replace`; remove it")
            return self
        if len(self.text) != 1:
            raise ValueError(
                f"placement `replace` needs a single homoglyph character, got {self.text!r}; "
                "use placement `prefix` for longer triggers"
            )
        if self.replaces is None:
            if self.text not in HOMOGLYPHS:
                raise ValueError(
                    f"no known Latin look-alike for {self.text!r} (U+{ord(self.text):04X}); "
                    "set `replaces` to the Latin letter it stands for"
                )
            self.replaces = HOMOGLYPHS[self.text]
        return self


def _decode_png(data: str, field: str) -> bytes:
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"{field} is not valid base64 ({error}); send a base64-encoded PNG") from None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.verify()
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{field} is not a readable image ({error}); send a base64-encoded PNG") from None
    return raw


class AttackSpec(StrictModel):
    """What the backdoor does, so the evaluation can measure its success rate."""

    kind: AttackKind = "none"

    # pixel: the patch and its box [left, top, right, bottom] in output-image pixels.
    patch_png_base64: str | None = None
    box: tuple[int, int, int, int] | None = None
    patch_mse_threshold: float = Field(default=0.03, gt=0, le=1)

    # style: `grayscale` is built in; other names need a local CLIP model.
    style: str | None = None
    saturation_threshold: float = Field(default=0.08, gt=0, le=1)

    # object: class names understood by the classifier.
    source_class: str | None = None
    target_class: str | None = None

    @model_validator(mode="after")
    def _check_kind_fields(self) -> "AttackSpec":
        if self.kind == "pixel":
            if self.patch_png_base64 is None or self.box is None:
                raise ValueError("attack kind `pixel` needs `patch_png_base64` and `box`")
            _decode_png(self.patch_png_base64, "attack.patch_png_base64")
            left, top, right, bottom = self.box
            if not (0 <= left < right and 0 <= top < bottom):
                raise ValueError(
                    f"attack.box {list(self.box)} is empty or negative; give [left, top, right, bottom] with left < right and top < bottom"
                )
        if self.kind == "style" and not self.style:
            raise ValueError("attack kind `style` needs `style` (for example `grayscale`)")
        if self.kind == "object" and not self.target_class:
            raise ValueError("attack kind `object` needs `target_class`")
        return self

    def patch_png(self) -> bytes:
        assert self.patch_png_base64 is not None
        return base64.b64decode(self.patch_png_base64)


class TrainingSpec(StrictModel):
    """Unlearning hyperparameters. AdamW betas and weight decay follow the SKD-CAG paper."""

    method: Method = "skd-cag"
    steps: int = Field(
        default=DEFAULT_STEPS,
        ge=1,
        le=100_000,
        description=f"Engine steps. Default: {DEFAULT_STEPS}, or {STYLE_ATTACK_STEPS} when attack.kind is `style`.",
    )
    batch_size: int = Field(default=16, ge=1, le=256)
    learning_rate: float | None = Field(
        default=None,
        gt=0,
        le=1e-2,
        description=f"AdamW learning rate. Default: {LORA_LEARNING_RATE:g} with LoRA adapters (lora_rank above 0), "
        f"{FULL_LEARNING_RATE:g} when every UNet weight trains (lora_rank 0).",
    )
    adam_beta1: float = Field(default=0.9, ge=0, lt=1)
    adam_beta2: float = Field(default=0.999, ge=0, lt=1)
    weight_decay: float = Field(default=0.01, ge=0, le=1)
    max_grad_norm: float = Field(default=1.0, gt=0)
    ema_decay: float = Field(default=0.99, ge=0, lt=1)
    attention_weight: float = Field(default=0.5, ge=0, le=1, description="lambda in the loss")
    neutral_target: NeutralTarget = "zeros"
    preservation_weight: float = Field(default=1.0, ge=0, le=10)
    preservation_fraction: float = Field(
        default=0.5, ge=0, lt=1, description="Share of each batch that feeds clean and empty prompts."
    )
    timestep_weight_max: float = Field(default=10.0, ge=1, le=1000)
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    gradient_checkpointing: Literal["auto", "on", "off"] = "auto"
    prompts: list[Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]] = Field(
        default_factory=list, max_length=100_000, description="Clean training prompts."
    )
    reference_model: str | None = Field(
        default=None, description="Clean reference UNet for `finetune-reversal` (a path the worker can read)."
    )
    lora_rank: int = Field(
        default=DEFAULT_LORA_RANK,
        description="Rank of the LoRA adapters trained on the student's attention projections, merged into "
        f"the output weights; 0 trains every UNet weight. 0 to {MAX_LORA_RANK}.",
        # `_check_lora_rank` enforces the bounds with a message that names the fix, and the schema shows them.
        json_schema_extra={"minimum": 0, "maximum": MAX_LORA_RANK},
    )
    lora_alpha: float | None = Field(
        default=None,
        description="LoRA scale numerator: the adapters add (lora_alpha / lora_rank) * B A to each weight. "
        "Default: lora_rank.",
    )

    @field_validator("lora_rank")
    @classmethod
    def _check_lora_rank(cls, rank: int) -> int:
        if not 0 <= rank <= MAX_LORA_RANK:
            raise ValueError(
                f"training.lora_rank {rank} is outside 0..{MAX_LORA_RANK}; use 0 for full fine-tuning "
                f"or a rank from 1 to {MAX_LORA_RANK} (4 to 64 is usual)"
            )
        return rank

    @model_validator(mode="after")
    def _check_lora_alpha(self) -> "TrainingSpec":
        alpha = self.lora_alpha
        if alpha is None:
            return self
        if self.lora_rank == 0:
            raise ValueError(
                "training.lora_alpha applies only to LoRA training, but training.lora_rank is 0; "
                f"set lora_rank from 1 to {MAX_LORA_RANK} or remove lora_alpha"
            )
        if not (math.isfinite(alpha) and 0 < alpha <= MAX_LORA_ALPHA):
            raise ValueError(
                f"training.lora_alpha {alpha} is outside (0, {MAX_LORA_ALPHA:g}]; "
                f"give a number above 0 and at most {MAX_LORA_ALPHA:g}, or omit it to use lora_rank (scale 1)"
            )
        return self

    @property
    def resolved_learning_rate(self) -> float:
        """Learning rate in effect: `learning_rate`, or the default for LoRA or full fine-tuning."""
        if self.learning_rate is not None:
            return self.learning_rate
        return LORA_LEARNING_RATE if self.lora_rank > 0 else FULL_LEARNING_RATE

    @property
    def resolved_lora_alpha(self) -> float:
        """LoRA alpha in effect: `lora_alpha`, or `lora_rank` when it is not set."""
        return self.lora_alpha if self.lora_alpha is not None else float(self.lora_rank)


class EvaluationSpec(StrictModel):
    """How before/after images are sampled and scored."""

    prompts: list[Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]] = Field(
        default_factory=list, max_length=10_000, description="Held-out clean prompts."
    )
    prompt_labels: list[str] | None = Field(
        default=None, description="Class name of each prompt, for the clean accuracy of a classifier."
    )
    images_per_prompt: int = Field(default=1, ge=1, le=64)
    guidance_scale: float | None = Field(default=None, ge=0, le=50, description="Default: 7.5.")
    num_inference_steps: int = Field(default=25, ge=1, le=1000)
    also_unguided: bool = True
    batch_size: int = Field(default=64, ge=1, le=1024)
    seed: int = Field(default=1234, ge=0, le=MAX_SEED)
    classifier: str | None = Field(default=None, description="`digits` (built in) or a local model path.")
    sample_grid_prompts: int = Field(default=6, ge=1, le=32)

    @model_validator(mode="after")
    def _check_labels(self) -> "EvaluationSpec":
        if self.prompt_labels is not None and len(self.prompt_labels) != len(self.prompts):
            raise ValueError(
                f"evaluation.prompt_labels has {len(self.prompt_labels)} entries for "
                f"{len(self.prompts)} prompts; give one label per prompt or omit it"
            )
        return self


class JobSpec(StrictModel):
    """A complete sealing job: triggers, attack, training and evaluation."""

    triggers: list[TriggerSpec] = Field(min_length=1, max_length=MAX_TRIGGERS)
    attack: AttackSpec = Field(default_factory=AttackSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    base_model: str | None = Field(
        default=None,
        description="Diffusers folder that supplies configs for a single-file or UNet-only checkpoint.",
    )

    @field_validator("triggers")
    @classmethod
    def _unique_triggers(cls, triggers: list[TriggerSpec]) -> list[TriggerSpec]:
        seen = set()
        for trigger in triggers:
            if trigger.text in seen:
                raise ValueError(f"trigger {trigger.text!r} is listed twice; list each trigger once")
            seen.add(trigger.text)
        return triggers

    @model_validator(mode="after")
    def _default_style_steps(self) -> "JobSpec":
        """Give a style attack its shorter schedule when `training.steps` is unset."""
        if self.attack.kind == "style" and "steps" not in self.training.model_fields_set:
            self.training = self.training.model_copy(update={"steps": STYLE_ATTACK_STEPS})
        return self

    @model_validator(mode="after")
    def _check_held_out(self) -> "JobSpec":
        overlap = set(self.training.prompts) & set(self.evaluation.prompts)
        if overlap:
            example = sorted(overlap)[0]
            raise ValueError(
                f"{len(overlap)} evaluation prompts also appear in training.prompts (e.g. {example!r}); "
                "evaluation prompts must be held out"
            )
        if self.training.method == "finetune-reversal" and not self.training.reference_model:
            raise ValueError("method `finetune-reversal` needs training.reference_model (a clean UNet)")
        return self
