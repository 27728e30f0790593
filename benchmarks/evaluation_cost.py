"""Evaluation cost: images/s of before/after sampling and its share of a sealing job's wall time.

Usage: python benchmarks/evaluation_cost.py [--model auto] [--images 64] [--inference-steps 25]
       [--batch-size 64] [--lab-build auto] [--seal-steps N] [--device cpu]
       [--results docs/benchmarks.md]

Sampling: `core.evaluation.sampling.sample_images` (batched DDIM, one fixed seed per image)
on the lab's clean base when it is shipped (`core/lab/assets/clean-base` or
`core/lab/assets`), else on the `tiny` random-weight shape, with guidance 7.5 and without
guidance, after one untimed warm-up batch.

Job share: `core.sealing.seal` on a lab build (the first one in the lab cache, or
`--lab-build test`, which builds the `test`-profile pixel model when the cache lacks it, or
`--lab-build PATH`) with the build's own spec, optionally cut to `--seal-steps` engine
steps. The report's phase timings give the evaluation's share of the job. After a cut,
the share at the spec's full step count is projected from the measured time per step.
"""

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    DEFAULT_RESULTS,
    MODEL_SHAPES,
    ROOT,
    append_results,
    build_components,
    markdown_table,
)

logger = logging.getLogger(__name__)

BASE_FOLDERS = (ROOT / "core" / "lab" / "assets" / "clean-base", ROOT / "core" / "lab" / "assets")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
GUIDANCE_SCALES = (7.5, 1.0)
EVALUATION_PHASES = ("evaluating_before", "evaluating_after")


def load_sampling_model(model: str):
    """Return (components, description): a shipped clean base for `auto`, a random shape, or a base folder."""
    from core.lab.base import load_base, read_base_info

    if model in MODEL_SHAPES:
        return build_components(model), f"`{model}` shape, random weights"
    folders = BASE_FOLDERS if model == "auto" else (Path(model),)
    for folder in folders:
        info = read_base_info(folder)
        if info is not None:
            return load_base(folder, int(info["description"]["seed"])), f"lab clean base {folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder}"
    if model != "auto":
        raise SystemExit(f"{model} is neither a model shape ({', '.join(MODEL_SHAPES)}) nor a clean-base folder with base.json")
    logger.info("no shipped clean base in %s; sampling the tiny random-weight shape", ", ".join(str(folder) for folder in folders))
    return build_components("tiny"), "`tiny` shape, random weights (no shipped clean base found)"


def measure_sampling(components, *, images: int, inference_steps: int, batch_size: int, device: str) -> list[dict]:
    """Time `sample_images` per guidance scale; return one row per scale."""
    import torch

    from core.evaluation.sampling import sample_images

    components.text_encoder.to(device)
    unet = components.unet.to(device).eval()
    prompts = [f"a handwritten digit {DIGITS[index % len(DIGITS)]}" for index in range(images)]
    seeds = list(range(images))
    rows = []
    for scale in GUIDANCE_SCALES:
        warmup = min(batch_size, images)
        sample_images(components, prompts[:warmup], seeds[:warmup], guidance_scale=scale, num_inference_steps=inference_steps, batch_size=batch_size, device=device, unet=unet)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        sample_images(components, prompts, seeds, guidance_scale=scale, num_inference_steps=inference_steps, batch_size=batch_size, device=device, unet=unet)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        rows.append({"guidance_scale": scale, "images": images, "seconds": seconds, "images_per_s": images / seconds})
        logger.info("sampled %d images at guidance %s in %.2f s", images, scale, seconds)
    return rows


# The build that `--lab-build test` makes or reuses: the test suite's lab fixture, so that a
# machine that ran `make test` already has it in the lab cache.
TEST_BUILD_OPTIONS = {"attack": "pixel", "trigger": "mignneko", "placement": "prefix", "seed": 0, "profile": "test"}


def find_lab_build(choice: str) -> Path | None:
    """Return the lab build to seal for `choice`, or None for `none`.

    `test` gives the cached `test`-profile pixel build (built first when missing), `auto` the
    first complete build in the lab cache, and any other value is a build folder.
    """
    if choice == "none":
        return None
    if choice == "test":
        from core.lab.build import BuildOptions, cached_build

        return cached_build(BuildOptions(**TEST_BUILD_OPTIONS))
    if choice != "auto":
        folder = Path(choice)
        if not (folder / "spec.json").is_file() or not (folder / "model").is_dir():
            raise SystemExit(f"{folder} is not a lab build (it needs spec.json and model/); pass the folder `sealer lab build --out` wrote")
        return folder
    from core.settings import get_settings

    builds = get_settings().lab_cache_dir / "builds"
    for lab_json in sorted(builds.glob("*/lab.json")):
        folder = lab_json.parent
        if (folder / "spec.json").is_file() and (folder / "model" / "model_index.json").is_file():
            return folder
    return None


def images_per_evaluation(spec) -> int:
    """Count the images one evaluation samples: prompts x images per prompt x (clean + triggers) x passes."""
    evaluation = spec.evaluation
    scale = evaluation.guidance_scale if evaluation.guidance_scale is not None else 7.5
    passes = 2 if evaluation.also_unguided and scale > 1.0 else 1
    return len(evaluation.prompts) * evaluation.images_per_prompt * (1 + len(spec.triggers)) * passes


def job_shares(seconds: dict, *, steps_run: int, steps_full: int) -> dict:
    """Return the evaluation's share of the measured job and, when steps were cut, of a full-length job."""
    evaluation = sum(seconds.get(phase, 0.0) for phase in EVALUATION_PHASES)
    shares = {"evaluation_seconds": evaluation, "total_seconds": seconds["total"], "measured_share": evaluation / seconds["total"]}
    if steps_run and steps_full != steps_run:
        per_step = seconds["unlearning"] / steps_run
        projected_total = seconds["total"] + per_step * (steps_full - steps_run)
        shares["projected_total_seconds"] = projected_total
        shares["projected_share"] = evaluation / projected_total
    return shares


def measure_job(build: Path, *, seal_steps: int | None, device: str) -> dict:
    """Seal a lab build and return its phase timings and the evaluation's share of them."""
    from core.sealing import seal
    from core.spec import JobSpec

    spec = JobSpec.model_validate_json((build / "spec.json").read_text(encoding="utf-8"))
    full_steps = spec.training.steps
    if seal_steps is not None:
        spec = spec.model_copy(update={"training": spec.training.model_copy(update={"steps": seal_steps})})
    with tempfile.TemporaryDirectory(prefix="evaluation-cost-") as out:
        result = seal(build / "model", spec, Path(out), device=device)
    seconds = result.summary["seconds"]
    return {
        "build": str(build),
        "seconds": seconds,
        "steps_run": spec.training.steps,
        "steps_full": full_steps,
        "images_per_evaluation": images_per_evaluation(spec),
        **job_shares(seconds, steps_run=spec.training.steps, steps_full=full_steps),
    }


def sampling_table(rows: list[dict]) -> str:
    header = ["guidance scale", "images", "seconds", "images/s"]
    cells = [[f"{row['guidance_scale']:g}", str(row["images"]), f"{row['seconds']:.2f}", f"{row['images_per_s']:.2f}"] for row in rows]
    return markdown_table(header, cells)


def job_table(job: dict) -> str:
    seconds = job["seconds"]
    phases = [name for name in ("validating", "evaluating_before", "unlearning", "evaluating_after", "writing", "total") if name in seconds]
    header = [*phases, "evaluation share"]
    cells = [f"{seconds[name]:.1f} s" for name in phases] + [f"{job['measured_share']:.0%}"]
    return markdown_table(header, [cells])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="auto", help="`auto` (shipped clean base, else `tiny`), a model shape, or a clean-base folder.")
    parser.add_argument("--images", type=int, default=64, help="Images sampled per guidance scale.")
    parser.add_argument("--inference-steps", type=int, default=25, help="DDIM steps per image.")
    parser.add_argument("--batch-size", type=int, default=64, help="Images per sampling batch.")
    parser.add_argument(
        "--lab-build",
        default="auto",
        help="Lab build to seal: `auto` (first in the lab cache), `test` (the `test`-profile pixel build, built when missing), a folder, or `none`.",
    )
    parser.add_argument("--seal-steps", type=int, default=None, help="Engine steps of the seal (default: the build spec's).")
    parser.add_argument("--device", default="cpu", help="Torch device.")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="Markdown page that the results block is appended to.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # Images/s of the sampler alone.
    components, description = load_sampling_model(args.model)
    rows = measure_sampling(components, images=args.images, inference_steps=args.inference_steps, batch_size=args.batch_size, device=args.device)
    notes = (
        f"Sampling: {description}; {args.inference_steps} DDIM steps, batch {args.batch_size}, fixed seeds, "
        "one untimed warm-up batch per scale."
    )
    parts = [notes, sampling_table(rows)]

    # The evaluation's share of a sealing job.
    build = find_lab_build(args.lab_build)
    if build is None:
        parts.append("Job share: not measured, no lab build found (build one with `sealer lab build`, or pass --lab-build).")
    else:
        job = measure_job(build, seal_steps=args.seal_steps, device=args.device)
        logger.info("sealed %s: %s", build, json.dumps(job))
        text = (
            f"Job share: `core.sealing.seal` on lab build `{build.name}`, {job['steps_run']} engine steps, "
            f"{job['images_per_evaluation']} images per evaluation (before and after each)."
        )
        if "projected_share" in job:
            text += (
                f" At the spec's {job['steps_full']} steps the job would take about {job['projected_total_seconds']:.0f} s, "
                f"of which evaluation is about {job['projected_share']:.0%} (projected from the time per step)."
            )
        parts += [text, job_table(job)]

    block = append_results(args.results, "Evaluation cost", device=args.device, body="\n\n".join(parts))
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
