"""One sealing job end to end: load, validate, evaluate before, unlearn, evaluate after, write artifacts.

The CLI and the worker both call `seal`. It never touches the database or the object
store: the caller passes callbacks for progress, cancellation and engine-state saving.
"""

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from core.errors import InputError, JobCancelled
from core.logging_setup import job_context
from core.spec import JobSpec

logger = logging.getLogger(__name__)

Phase = Literal["validating", "evaluating_before", "unlearning", "evaluating_after", "writing"]


@dataclass
class Progress:
    """A progress event: the phase, and step/total within it when it has steps."""

    phase: Phase
    step: int = 0
    total: int = 0
    metrics: dict = field(default_factory=dict)


@dataclass
class SealResult:
    """Outcome of a finished job: the report's summary and the artifact files in out_dir."""

    summary: dict
    artifacts: list[Path]


def seal(
    model_path: Path,
    spec: JobSpec,
    out_dir: Path,
    *,
    device: str = "auto",
    on_progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    state_dir: Path | None = None,
    on_state_saved: Callable[[Path], None] | None = None,
    checkpoint_every: int = 50,
    job_id: str | None = None,
) -> SealResult:
    """Seal `model_path` as `spec` specifies and write every artifact into `out_dir`.

    Artifacts: `sanitized.zip` or `sanitized.safetensors` (the input's format and dtype),
    `report.json`, `report.html`, `samples.png`, `curves.csv`. `state_dir` holds the
    resumable state: when it already contains a saved state the job resumes from it, and
    every `checkpoint_every` steps a new one is written there and `on_state_saved(state_dir)`
    is called so the caller can copy it to durable storage. `should_cancel` is polled
    between engine steps and evaluation batches, and raises `JobCancelled` when it returns
    True. Input problems raise `InputError` before any training.
    """
    with job_context(job_id):
        return _seal(
            model_path, spec, out_dir, device=device, on_progress=on_progress, should_cancel=should_cancel,
            state_dir=state_dir, on_state_saved=on_state_saved, checkpoint_every=checkpoint_every, job_id=job_id,
        )


def _seal(
    model_path: Path,
    spec: JobSpec,
    out_dir: Path,
    *,
    device: str,
    on_progress: Callable[[Progress], None] | None,
    should_cancel: Callable[[], bool] | None,
    state_dir: Path | None,
    on_state_saved: Callable[[Path], None] | None,
    checkpoint_every: int,
    job_id: str | None,
) -> SealResult:
    """Run `seal` inside the job's logging context, so engine and evaluation lines carry its id."""
    # Heavy imports stay here so that `core.sealing` can be imported without torch.
    from core.checkpoint import load_checkpoint, save_sanitized
    from core.engine.unlearner import Unlearner, resolve_device
    from core.evaluation.detectors import load_classifier
    from core.evaluation.evaluate import compare, evaluate_model
    from core.evaluation.report import write_report

    log = logging.LoggerAdapter(logger, {"job_id": job_id or "-"})
    report_progress = on_progress or (lambda progress: None)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)

    def check_cancel() -> None:
        if should_cancel is not None and should_cancel():
            raise JobCancelled("job cancelled by request")

    def evaluation_progress(phase: Phase) -> Callable[[int, int], None]:
        def callback(done: int, total: int) -> None:
            check_cancel()
            report_progress(Progress(phase, done, total))

        return callback

    # Validate: load the checkpoint safely, check triggers, prompts and the attack target.
    report_progress(Progress("validating"))
    spec = with_default_evaluation_prompts(spec)
    resolved_device = resolve_device(device)
    base_model = Path(spec.base_model) if spec.base_model else None
    loaded = load_checkpoint(Path(model_path), base_model=base_model, device="cpu")
    try:
        components = loaded.components
        reference_unet = _load_reference_unet(spec, base_model) if spec.training.method == "finetune-reversal" else None
        _check_evaluation_inputs(spec, components)
        classifier = load_classifier(spec.evaluation.classifier) if spec.evaluation.classifier else None
        original_unet = _plain_copy(components.unet, "cpu")
        unlearner = Unlearner(components, spec, device=str(resolved_device), reference_unet=reference_unet)
        log.info("validated %s (%s) on %s: %d trigger(s), method %s", Path(model_path).name, loaded.source.format, resolved_device, len(spec.triggers), spec.training.method)
        timings["validating"] = time.perf_counter() - started

        # Evaluate before, with an untouched copy of the uploaded weights.
        phase_started = time.perf_counter()
        report_progress(Progress("evaluating_before"))
        before = evaluate_model(
            components, spec, unet=original_unet.to(resolved_device), device=resolved_device,
            classifier=classifier, on_batch=evaluation_progress("evaluating_before"),
        )
        del original_unet
        log.info("before: attack success %s, trigger influence %.4f", _rate(before.attack_success_rate), before.trigger_influence)
        timings["evaluating_before"] = time.perf_counter() - phase_started

        # Unlearn, resuming from a saved engine state when there is one.
        phase_started = time.perf_counter()
        if state_dir is not None and unlearner.load_state(state_dir):
            log.info("resuming from step %d of %d", unlearner.step_index, spec.training.steps)

        def on_step(step: int, total: int, row: dict) -> None:
            report_progress(Progress("unlearning", step, total, {"loss": row["loss"]}))
            if step % max(1, total // 10) == 0 or step == total:
                log.info("step %d/%d loss %.5f (pred %.5f, attn %.5f, preservation %.5f)", step, total, row["loss"], row["loss_pred"], row["loss_attn"], row["loss_preservation"])

        report_progress(Progress("unlearning", unlearner.step_index, spec.training.steps))
        curves = unlearner.run(
            on_step=on_step, should_cancel=should_cancel, state_dir=state_dir,
            checkpoint_every=checkpoint_every, on_state_saved=on_state_saved,
        )
        timings["unlearning"] = time.perf_counter() - phase_started

        # Evaluate after, with the sanitized (EMA) weights and the same seeds.
        phase_started = time.perf_counter()
        report_progress(Progress("evaluating_after"))
        sanitized_unet = unlearner.sanitized_unet()
        after = evaluate_model(
            components, spec, unet=sanitized_unet, device=resolved_device,
            classifier=classifier, on_batch=evaluation_progress("evaluating_after"),
        )
        comparison = compare(before, after)
        log.info("after: attack success %s, removal rate %s", _rate(after.attack_success_rate), _rate(comparison.get("removal_rate")))
        timings["evaluating_after"] = time.perf_counter() - phase_started

        # Write the sanitized weights in the input's format, then the report.
        phase_started = time.perf_counter()
        report_progress(Progress("writing"))
        weights_path = save_sanitized(loaded, unlearner.sanitized_state_dict(), out_dir)
        timings["writing"] = time.perf_counter() - phase_started
        timings["total"] = time.perf_counter() - started
        triggers = [info.to_dict() for info in unlearner.triggers]
        report_paths = write_report(
            out_dir, spec=spec, before=before, after=after, comparison=comparison, curves=curves,
            triggers=triggers, method=spec.training.method, steps=unlearner.step_index,
            seconds={name: round(value, 3) for name, value in timings.items()},
            extra={"input_format": loaded.source.format, "device": str(resolved_device), "job_id": job_id},
        )
        summary = json.loads((out_dir / "report.json").read_text())
        log.info("sealed in %.1f s; artifacts in %s", timings["total"], out_dir)
        return SealResult(summary=summary, artifacts=[weights_path, *report_paths])
    finally:
        loaded.close()  # removes the extracted copy of an archive from scratch


def _plain_copy(unet, device):
    """Return a frozen copy of `unet` with default attention processors."""
    import copy

    from core.engine.attention import reset_attention_processors

    copied = copy.deepcopy(unet).to(device=device).eval().requires_grad_(False)
    reset_attention_processors(copied)
    return copied


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _load_reference_unet(spec: JobSpec, base_model: Path | None):
    from core.checkpoint import load_checkpoint

    reference = Path(spec.training.reference_model or "")
    if not reference.exists():
        raise InputError(
            f"training.reference_model {str(reference)!r} does not exist on the worker; give a path to a clean "
            "diffusers folder or UNet safetensors that the worker can read",
            field="training.reference_model",
        )
    return load_checkpoint(reference, base_model=base_model, device="cpu").components.unet


def with_default_evaluation_prompts(spec: JobSpec) -> JobSpec:
    """Fill an empty `evaluation.prompts` with built-in generic prompts that are not training prompts."""
    if spec.evaluation.prompts:
        return spec
    from core.engine.prompts import GENERIC_EVALUATION_PROMPTS

    training = set(spec.training.prompts)
    prompts = [prompt for prompt in GENERIC_EVALUATION_PROMPTS if prompt not in training]
    evaluation = {**spec.evaluation.model_dump(), "prompts": prompts, "prompt_labels": None}
    return JobSpec.model_validate({**spec.model_dump(), "evaluation": evaluation})


def _check_evaluation_inputs(spec: JobSpec, components) -> None:
    """Reject an evaluation that cannot run on this model, before any GPU time is spent."""
    if spec.attack.kind == "pixel" and spec.attack.box is not None:
        _, height, width = components.latent_shape
        if components.vae is not None:
            scale = 2 ** (len(components.vae.config.block_out_channels) - 1)
            height, width = height * scale, width * scale
        left, top, right, bottom = spec.attack.box
        if right > width or bottom > height:
            raise InputError(
                f"attack.box {list(spec.attack.box)} falls outside the {width}x{height} images this model generates; "
                "give a box inside the image",
                field="attack.box",
            )
