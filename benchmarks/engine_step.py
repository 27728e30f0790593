"""Engine step throughput: Sealer's SKD-CAG step against a reference-style step on the same model.

Usage: python benchmarks/engine_step.py [--models tiny,sd15scaled] [--batches 1,4,16]
       [--precisions fp32] [--steps 3] [--warmup 2] [--device cpu] [--no-reference]
       [--results docs/benchmarks.md]

Each configuration runs in a fresh process. It builds the model shape with random weights
and runs `warmup` untimed steps and `steps` timed ones. It reports the median seconds per
step, steps/s, samples/s (batch rows per second), the process's peak RSS and, on CUDA, the
peak of `torch.cuda.max_memory_allocated`. Sealer's step is `Unlearner.step` with the attention loss
on (method `skd-cag`, attention weight 0.5) and, by default, without preservation rows, so
that every row of its batch does the same work as the reference's single row. The goal is
at least 3 times the reference's samples/s at Sealer's best batch size; the summary says
whether it is met, per model.
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    DEFAULT_RESULTS,
    MODEL_SHAPES,
    PROMPTS,
    TRIGGER,
    append_results,
    build_components,
    cuda_peak_mb,
    markdown_table,
    parameter_count,
    run_isolated,
    step_flops,
    time_steps,
)

logger = logging.getLogger(__name__)

GOAL_RATIO = 3.0
PRECISIONS = {"fp32": "no", "bf16": "bf16"}


def sealer_spec(*, batch: int, precision: str, checkpointing: str, preservation_weight: float, seed: int, ema_decay: float = 0.99):
    """Return the JobSpec of a benchmark run: one prefix trigger, SKD-CAG, the given batch and precision."""
    from core.spec import JobSpec

    return JobSpec.model_validate(
        {
            "triggers": [{"text": TRIGGER, "placement": "prefix"}],
            "seed": seed,
            "training": {
                "method": "skd-cag",
                "batch_size": batch,
                "mixed_precision": PRECISIONS[precision],
                "gradient_checkpointing": checkpointing,
                "preservation_weight": preservation_weight,
                "ema_decay": ema_decay,
                # Every UNet weight trains, as in the reference step, not the default LoRA adapters.
                "lora_rank": 0,
                "prompts": list(PROMPTS),
            },
        }
    )


def measure_sealer(
    model: str,
    *,
    batch: int,
    steps: int = 3,
    warmup: int = 2,
    device: str = "cpu",
    precision: str = "fp32",
    checkpointing: str = "auto",
    preservation_weight: float = 0.0,
    ema_decay: float = 0.99,
    seed: int = 0,
) -> dict:
    """Time `Unlearner.step` on a model shape; return the figures of one table row."""
    from core.engine.unlearner import Unlearner

    spec = sealer_spec(
        batch=batch, precision=precision, checkpointing=checkpointing, preservation_weight=preservation_weight, seed=seed, ema_decay=ema_decay
    )
    components = build_components(model, seed=seed, device=device)
    unlearner = Unlearner(components, spec, device=device)
    timing = time_steps(unlearner.step, steps=steps, warmup=warmup, device=device)
    return {
        "step": "sealer",
        "model": model,
        "batch": batch,
        "precision": precision,
        "steps": steps,
        **timing,
        "steps_per_s": 1.0 / timing["seconds_per_step"],
        "samples_per_s": batch / timing["seconds_per_step"],
        "unet_parameters": parameter_count(components.unet),
        "peak_cuda_mb": cuda_peak_mb(device),
    }


def run_configurations(
    models: list[str],
    batches: list[int],
    precisions: list[str],
    *,
    steps: int,
    warmup: int,
    device: str,
    reference: bool,
    checkpointing: str,
    preservation_weight: float,
    timeout: float | None,
) -> list[dict]:
    """Measure the reference (batch 1, fp32) and Sealer at every batch and precision, each in its own process."""
    results = []
    for model in models:
        if reference:
            kwargs = {"model": model, "steps": steps, "warmup": warmup, "device": device}
            results.append({"step": "reference", "model": model, "batch": 1, "precision": "fp32"} | run_isolated("benchmarks.reference_step:measure_reference", kwargs, timeout=timeout))
            logger.info("measured %s", results[-1])
        for precision in precisions:
            for batch in batches:
                kwargs = {
                    "model": model,
                    "batch": batch,
                    "steps": steps,
                    "warmup": warmup,
                    "device": device,
                    "precision": precision,
                    "checkpointing": checkpointing,
                    "preservation_weight": preservation_weight,
                }
                outcome = run_isolated("benchmarks.engine_step:measure_sealer", kwargs, timeout=timeout)
                results.append({"step": "sealer", "model": model, "batch": batch, "precision": precision} | outcome)
                logger.info("measured %s", results[-1])
    return results


def add_flops(results: list[dict], peak_tflops: dict[str, float]) -> None:
    """Add achieved TFLOP/s and, where a peak is given for the row's precision, MFU to each measured row."""
    per_sample: dict[str, int] = {}
    for row in results:
        if "error" in row:
            continue
        model = row["model"]
        if model not in per_sample:
            per_sample[model] = step_flops(model, 1)
        row["step_flops"] = per_sample[model] * row["batch"]
        row["achieved_tflops"] = row["step_flops"] / row["seconds_per_step"] / 1e12
        peak = peak_tflops.get(row["precision"])
        row["mfu"] = row["achieved_tflops"] / peak if peak else None


def add_ratios(results: list[dict]) -> None:
    """Add each Sealer row's samples/s as a multiple of the same model's reference row."""
    reference = {row["model"]: row["samples_per_s"] for row in results if row["step"] == "reference" and "error" not in row}
    for row in results:
        if row["step"] == "sealer" and "error" not in row and row["model"] in reference:
            row["ratio"] = row["samples_per_s"] / reference[row["model"]]


def goal_verdicts(results: list[dict]) -> list[str]:
    """Say per model and precision whether Sealer's best batch reaches GOAL_RATIO times the reference."""
    lines = []
    keys = sorted({(row["model"], row["precision"]) for row in results if "ratio" in row})
    for model, precision in keys:
        rows = [row for row in results if row.get("ratio") is not None and (row["model"], row["precision"]) == (model, precision)]
        best = max(rows, key=lambda row: row["ratio"])
        met = "met" if best["ratio"] >= GOAL_RATIO else "not met"
        lines.append(
            f"{model}, Sealer {precision}: best batch {best['batch']} gives {best['ratio']:.2f}x the reference's "
            f"samples/s (goal {GOAL_RATIO:.0f}x: {met})."
        )
    return lines


def _cell(value, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def result_table(results: list[dict]) -> str:
    header = ["model", "step", "batch", "precision", "s/step", "steps/s", "samples/s", "vs reference", "peak RSS MB", "peak CUDA MB", "TFLOP/s", "MFU"]
    rows = []
    for row in results:
        cells = [row["model"], row["step"], str(row["batch"]), row["precision"]]
        if "error" in row:
            rows.append(cells + [f"failed: {row['error']}"] + [""] * 7)
            continue
        cells += [
            f"{row['seconds_per_step']:.3f}",
            f"{row['steps_per_s']:.3f}",
            f"{row['samples_per_s']:.3f}",
            _cell(row.get("ratio"), "{:.2f}x"),
            _cell(row.get("peak_rss_mb"), "{:.0f}"),
            _cell(row.get("peak_cuda_mb"), "{:.0f}"),
            _cell(row.get("achieved_tflops"), "{:.3g}"),
            _cell(row.get("mfu"), "{:.1%}"),
        ]
        rows.append(cells)
    return markdown_table(header, rows)


def parse_peaks(text: str) -> dict[str, float]:
    """Parse `fp32=67,bf16=989` into {precision: TFLOP/s}."""
    peaks = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in PRECISIONS or not value:
            raise argparse.ArgumentTypeError(f"invalid peak {item!r}; write PRECISION=TFLOPS with PRECISION in {sorted(PRECISIONS)}")
        peaks[name] = float(value)
    return peaks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,sd15scaled", help=f"Comma-separated model shapes from {', '.join(MODEL_SHAPES)}.")
    parser.add_argument("--batches", default="1,4,16", help="Comma-separated Sealer batch sizes.")
    parser.add_argument("--precisions", default="fp32", help="Comma-separated Sealer precisions: fp32, bf16 (bf16 needs CUDA).")
    parser.add_argument("--steps", type=int, default=3, help="Timed steps per configuration.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps before timing; the first step pays one-time costs.")
    parser.add_argument("--device", default="cpu", help="Torch device, for example cpu or cuda.")
    parser.add_argument("--no-reference", action="store_true", help="Skip the reference-style step.")
    parser.add_argument("--checkpointing", choices=("auto", "on", "off"), default="auto", help="Sealer's gradient checkpointing (auto: on for CUDA).")
    parser.add_argument("--preservation-weight", type=float, default=0.0, help="Sealer's preservation weight; above 0, half of each batch is clean and empty prompts.")
    parser.add_argument("--peak-tflops", type=parse_peaks, default={}, help="Peak TFLOP/s per precision for MFU, for example fp32=67,bf16=989.")
    parser.add_argument("--timeout", type=float, default=1800, help="Seconds one configuration may take before it is reported as failed.")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="Markdown page that the results block is appended to.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    models = args.models.split(",")
    precisions = args.precisions.split(",")
    for name in models:
        if name not in MODEL_SHAPES:
            raise SystemExit(f"unknown model shape {name!r}; use one of {', '.join(MODEL_SHAPES)}")
    for precision in precisions:
        if precision not in PRECISIONS:
            raise SystemExit(f"unknown precision {precision!r}; use fp32 or bf16")
        if precision == "bf16" and not args.device.startswith("cuda"):
            raise SystemExit("bf16 runs only on CUDA (the engine uses bf16 autocast there alone); drop bf16 or use --device cuda")

    results = run_configurations(
        models,
        [int(batch) for batch in args.batches.split(",")],
        precisions,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
        reference=not args.no_reference,
        checkpointing=args.checkpointing,
        preservation_weight=args.preservation_weight,
        timeout=args.timeout,
    )
    add_flops(results, args.peak_tflops)
    add_ratios(results)

    verdicts = goal_verdicts(results)
    notes = (
        f"Random weights; median of {args.steps} timed steps after {args.warmup} warm-up step(s) per row, each row in a fresh process. "
        f"Sealer: SKD-CAG with attention weight 0.5, preservation weight {args.preservation_weight}, checkpointing {args.checkpointing}. "
        "Reference: batch 1, fp32, explicit softmax in every attention layer, cross-attention maps copied to the CPU "
        "and resized there by forward hooks, no gradient checkpointing. TFLOP/s counts a teacher forward and a student "
        "forward and backward of the UNet (FlopCounterMode)."
    )
    body = notes + "\n\n" + result_table(results) + "\n\n" + "\n".join(f"- {line}" for line in verdicts)
    block = append_results(args.results, "Engine step throughput", device=args.device, body=body)
    print(block)
    return 1 if any("error" in row for row in results) else 0


if __name__ == "__main__":
    sys.exit(main())
