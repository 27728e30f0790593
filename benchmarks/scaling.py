"""Scaling of Sealer's step: time against UNet size and against batch size.

Usage: python benchmarks/scaling.py [--sizes lab,sd15scaled,sd15] [--batch-models lab,tiny]
       [--batches 1,2,4,8,16] [--steps 3] [--warmup 2] [--full-budget 900] [--device cpu]
       [--results docs/benchmarks.md]

Size: every model of `--sizes` runs Sealer's step (SKD-CAG, fp32) at batch 1. On CPU the
full SD1.5 UNet (`sd15`) runs with one warm-up and one timed step, without the EMA shadow
and with gradient checkpointing, and only after two checks. Its estimated peak memory must
fit in the memory available now. Its estimated run time, from the FLOP/s measured on the
largest smaller model, must fit in `--full-budget` seconds. When either check fails, the
table gives the reason instead of a time.

Batch: every model of `--batch-models` runs at every batch of `--batches`. A least-squares
line t(B) = fixed + per_sample * B tells whether the step is compute-bound (the fixed part
is a small share of a batch-1 step, so time grows linearly with the batch) or bound by
per-step costs that batching spreads out.
"""

import argparse
import functools
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    DEFAULT_RESULTS,
    MODEL_SHAPES,
    append_results,
    available_memory_bytes,
    markdown_table,
    model_configs,
    run_isolated,
    step_flops,
)

logger = logging.getLogger(__name__)

FULL_MODEL = "sd15"
COMPUTE_BOUND_FIXED_SHARE = 0.25

# Bytes per UNet parameter during a step: student weights, teacher copy, gradient, AdamW's two
# moments and the EMA shadow, all float32.
TRAINING_BYTES_PER_PARAMETER = 6 * 4

# On CPU the full SD1.5 config runs without the EMA shadow and with gradient checkpointing, so
# that it fits in 24 GiB of RAM (measured peak 18.7 GB on a 2-core machine).
FULL_MODEL_CPU_OPTIONS = {"ema_decay": 0.0, "checkpointing": "on"}
FULL_MODEL_CPU_BYTES_PER_PARAMETER = TRAINING_BYTES_PER_PARAMETER - 4  # no float32 EMA shadow


@functools.cache
def parameter_counts(model: str) -> tuple[int, int]:
    """Return (UNet parameters, text encoder parameters) of a model shape, counted on the meta device."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_config, text_config, _ = model_configs(model)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    return sum(p.numel() for p in unet.parameters()), sum(p.numel() for p in text_encoder.parameters())


def width_of(model: str) -> int:
    return model_configs(model)[0]["block_out_channels"][0]


def estimate_full_run(measured: dict[tuple[str, int], dict], *, steps: int) -> dict:
    """Estimate the full SD1.5 config's peak memory and run time from the smaller models measured at batch 1.

    Memory: the smallest model's peak RSS stands for the process's fixed cost, the weights
    and optimizer state are counted exactly, and the activations of the largest smaller
    model are scaled by the ratio of block widths (same depth and resolution). That is an
    upper bound, because the full model runs with gradient checkpointing and without the EMA
    shadow (`FULL_MODEL_CPU_OPTIONS`). Time: the full model's FLOPs at the largest smaller
    model's FLOP/s. Both are estimates.
    """
    smaller = [(model, row) for (model, batch), row in measured.items() if batch == 1 and model != FULL_MODEL and "error" not in row]
    if len(smaller) < 1:
        return {}
    smallest_model, smallest = min(smaller, key=lambda item: item[1]["flops_per_step"])
    largest_model, largest = max(smaller, key=lambda item: item[1]["flops_per_step"])
    unet_params, text_params = parameter_counts(FULL_MODEL)
    large_unet, large_text = parameter_counts(largest_model)
    small_unet, small_text = parameter_counts(smallest_model)

    base = smallest["peak_rss_mb"] * 2**20 - TRAINING_BYTES_PER_PARAMETER * small_unet - 4 * small_text
    activations = largest["peak_rss_mb"] * 2**20 - base - TRAINING_BYTES_PER_PARAMETER * large_unet - 4 * large_text
    activations = max(activations, 0.0) * width_of(FULL_MODEL) / width_of(largest_model)
    memory = base + FULL_MODEL_CPU_BYTES_PER_PARAMETER * unet_params + 4 * text_params + activations

    flops_per_second = largest["flops_per_step"] / largest["seconds_per_step"]
    seconds_per_step = step_flops(FULL_MODEL, 1) / flops_per_second
    return {
        "memory_bytes": memory,
        "seconds_per_step": seconds_per_step,
        "seconds": seconds_per_step * steps,
        "from_model": largest_model,
    }


def measure(model: str, batch: int, *, steps: int, warmup: int, device: str, timeout: float | None, **options) -> dict:
    kwargs = {"model": model, "batch": batch, "steps": steps, "warmup": warmup, "device": device, "precision": "fp32"} | options
    row = {"model": model, "batch": batch} | run_isolated("benchmarks.engine_step:measure_sealer", kwargs, timeout=timeout)
    if "error" not in row:
        row["flops_per_step"] = step_flops(model, batch)
    logger.info("measured %s", row)
    return row


def run_sizes(sizes: list[str], measured: dict, args: argparse.Namespace) -> dict[str, str]:
    """Measure every size at batch 1; return a note per model that was skipped."""
    skipped = {}
    for model in sizes:
        if (model, 1) in measured:
            continue
        if model == FULL_MODEL and not args.device.startswith("cuda"):
            full_steps = 2
            estimate = estimate_full_run(measured, steps=full_steps)
            if not estimate:
                # Without a smaller model to scale from, weights and optimizer state are the lower bound.
                unet_params, text_params = parameter_counts(model)
                estimate = {"memory_bytes": FULL_MODEL_CPU_BYTES_PER_PARAMETER * unet_params + 4 * text_params, "seconds": 0.0}
            available = available_memory_bytes()
            if available is not None and estimate["memory_bytes"] > available:
                skipped[model] = (
                    f"skipped: needs about {estimate['memory_bytes'] / 2**30:.1f} GiB (estimate), "
                    f"{available / 2**30:.1f} GiB available"
                )
                continue
            if estimate["seconds"] > args.full_budget:
                skipped[model] = (
                    f"skipped: about {estimate['seconds_per_step']:.0f} s per step (estimated from {estimate['from_model']}'s FLOP/s), "
                    f"{full_steps} steps exceed the {args.full_budget:.0f} s budget"
                )
                continue
            measured[(model, 1)] = measure(
                model, 1, steps=1, warmup=1, device=args.device, timeout=args.full_budget * 2, **FULL_MODEL_CPU_OPTIONS
            )
            continue
        measured[(model, 1)] = measure(model, 1, steps=args.steps, warmup=args.warmup, device=args.device, timeout=args.timeout)
    return skipped


def fit_line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares (fixed, per_sample) for t = fixed + per_sample * batch."""
    count = len(points)
    mean_b = sum(batch for batch, _ in points) / count
    mean_t = sum(seconds for _, seconds in points) / count
    spread = sum((batch - mean_b) ** 2 for batch, _ in points)
    slope = sum((batch - mean_b) * (seconds - mean_t) for batch, seconds in points) / spread
    return mean_t - slope * mean_b, slope


def batch_verdict(model: str, rows: list[dict]) -> str:
    """Describe how a model's step time grows with the batch, and whether it is compute-bound."""
    points = sorted((row["batch"], row["seconds_per_step"]) for row in rows if "error" not in row)
    if len(points) < 2:
        return f"{model}: fewer than two batch sizes measured; no fit."
    fixed, per_sample = fit_line(points)
    first_batch, first_seconds = points[0]
    last_batch, last_seconds = points[-1]
    fixed_share = max(fixed, 0.0) / first_seconds
    gain = (first_seconds / first_batch) / (last_seconds / last_batch)
    if fixed_share < COMPUTE_BOUND_FIXED_SHARE:
        kind = "compute-bound: time grows about linearly with the batch"
    else:
        kind = "bound by per-step costs at small batches: batching spreads them out"
    return (
        f"{model}: t(B) = {fixed:.3f} s + {per_sample:.3f} s x B; the fixed part is {fixed_share:.0%} of a batch-{first_batch} "
        f"step, and batch {last_batch} gives {gain:.2f}x the samples/s of batch {first_batch}. {kind[0].upper()}{kind[1:]}."
    )


def _row_cells(row: dict) -> list[str]:
    if "error" in row:
        return [f"failed: {row['error']}", "", "", ""]
    seconds = row["seconds_per_step"]
    return [
        f"{seconds:.3f}",
        f"{seconds / row['batch']:.3f}",
        f"{row['flops_per_step'] / seconds / 1e9:.1f}",
        f"{row['peak_rss_mb']:.0f}",
    ]


def size_table(sizes: list[str], measured: dict, skipped: dict[str, str]) -> str:
    header = ["model", "UNet parameters (M)", "GFLOP per sample-step", "s/step (batch 1)", "s/sample", "GFLOP/s", "peak RSS MB"]
    rows = []
    for model in sizes:
        unet_params, _ = parameter_counts(model)
        cells = [model, f"{unet_params / 1e6:.1f}", f"{step_flops(model, 1) / 1e9:.1f}"]
        if model in skipped:
            rows.append(cells + [skipped[model], "", "", ""])
        else:
            rows.append(cells + _row_cells(measured[(model, 1)]))
    return markdown_table(header, rows)


def batch_table(models: list[str], batches: list[int], measured: dict) -> str:
    header = ["model", "batch", "s/step", "s/sample", "GFLOP/s", "peak RSS MB"]
    rows = [[model, str(batch)] + _row_cells(measured[(model, batch)]) for model in models for batch in batches]
    return markdown_table(header, rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="lab,sd15scaled,sd15", help=f"Model shapes for the size sweep, from {', '.join(MODEL_SHAPES)}.")
    parser.add_argument("--batch-models", default="lab,tiny", help="Model shapes for the batch sweep.")
    parser.add_argument("--batches", default="1,2,4,8,16", help="Comma-separated batch sizes for the batch sweep.")
    parser.add_argument("--steps", type=int, default=3, help="Timed steps per configuration.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps before timing.")
    parser.add_argument("--full-budget", type=float, default=900, help="Seconds the full SD1.5 config may take on CPU.")
    parser.add_argument("--timeout", type=float, default=1800, help="Seconds one configuration may take before it is reported as failed.")
    parser.add_argument("--device", default="cpu", help="Torch device.")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="Markdown page that the results block is appended to.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sizes = args.sizes.split(",") if args.sizes else []
    batch_models = args.batch_models.split(",") if args.batch_models else []
    batches = [int(batch) for batch in args.batches.split(",")]
    for name in sizes + batch_models:
        if name not in MODEL_SHAPES:
            raise SystemExit(f"unknown model shape {name!r}; use one of {', '.join(MODEL_SHAPES)}")

    # The batch sweep first, so that its batch-1 rows serve the size sweep too. The full
    # SD1.5 config goes last: its estimate needs the smaller models' figures.
    measured: dict[tuple[str, int], dict] = {}
    for model in batch_models:
        for batch in batches:
            measured[(model, batch)] = measure(model, batch, steps=args.steps, warmup=args.warmup, device=args.device, timeout=args.timeout)
    sizes_ordered = sorted(sizes, key=lambda model: step_flops(model, 1))
    skipped = run_sizes(sizes_ordered, measured, args)

    notes = (
        "Sealer's step (SKD-CAG, attention weight 0.5, no preservation rows, fp32), random weights, median of "
        f"{args.steps} timed steps after {args.warmup} warm-up steps. The full SD1.5 config (`sd15`) on CPU runs one of each, "
        "without the EMA shadow and with gradient checkpointing so that it fits in memory. "
        "GFLOP counts a teacher forward and a student forward and backward of the UNet (FlopCounterMode)."
    )
    parts = [notes]
    if sizes:
        parts.append("Step time against UNet size, batch 1:\n\n" + size_table(sizes_ordered, measured, skipped))
    if batch_models:
        verdicts = [batch_verdict(model, [measured[(model, batch)] for batch in batches]) for model in batch_models]
        parts.append("Step time against batch size:\n\n" + batch_table(batch_models, batches, measured))
        parts.append("\n".join(f"- {line}" for line in verdicts))
    block = append_results(args.results, "Engine step scaling", device=args.device, body="\n\n".join(parts))
    print(block)
    return 1 if any("error" in row for row in measured.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
