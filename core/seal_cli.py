"""`sealer seal` and `sealer evaluate`: run the engine locally, without the service."""

import argparse
import json
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from core.errors import SealerError
from core.spec import JobSpec


def add_commands(subparsers) -> None:
    seal = subparsers.add_parser("seal", help="Remove a backdoor from a checkpoint and write the report.")
    _add_common_arguments(seal)
    seal.add_argument("--steps", type=int, help="Override training.steps from the spec.")
    seal.set_defaults(handler=run_seal, draws_progress=True)

    evaluate = subparsers.add_parser("evaluate", help="Measure a checkpoint's backdoor without changing it.")
    _add_common_arguments(evaluate)
    evaluate.set_defaults(handler=run_evaluate, draws_progress=True)


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="Diffusers folder, .zip/.tar of one, or .safetensors file.")
    parser.add_argument("--spec", required=True, type=Path, help="Job spec JSON file (triggers, attack, training, evaluation).")
    parser.add_argument("--out", required=True, type=Path, help="Folder for the artifacts; created if missing.")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="Where to run (default: auto).")


def read_spec(path: Path) -> JobSpec:
    """Read and validate a spec file; raise SealerError naming the bad field."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise SealerError(f"cannot read spec file {path}: {error.strerror}; check the path", field="spec", code="invalid_spec") from None
    try:
        return JobSpec.model_validate_json(text)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            location = ".".join(str(part) for part in item["loc"]) or "spec"
            problems.append(f"  {location}: {item['msg']}")
        raise SealerError(f"invalid spec {path}:\n" + "\n".join(problems), field="spec", code="invalid_spec") from None


class ProgressBar:
    """A one-line progress display on stderr: phase, bar, step/total, elapsed time."""

    def __init__(self, stream=sys.stderr, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.started = time.perf_counter()
        self.phase = ""

    def __call__(self, progress) -> None:
        if progress.phase != self.phase and self.phase:
            self.stream.write("\n")
        self.phase = progress.phase
        filled = int(self.width * progress.step / progress.total) if progress.total else 0
        bar = "#" * filled + "." * (self.width - filled)
        counter = f"{progress.step}/{progress.total}" if progress.total else ""
        elapsed = time.perf_counter() - self.started
        self.stream.write(f"\r{progress.phase:<18} [{bar}] {counter:>11} {elapsed:7.1f} s")
        self.stream.flush()

    def close(self) -> None:
        if self.phase:
            self.stream.write("\n")


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _number(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_summary(report: dict) -> str:
    """Return the before/after table that `sealer seal` and the demo print."""
    before, after = report.get("before", {}), report.get("after", {})
    fidelity = report.get("clean_fidelity", {})
    rows = [
        ("attack success (guided)", _percent(before.get("attack_success_rate")), _percent(after.get("attack_success_rate"))),
        ("attack success (unguided)", _percent(before.get("attack_success_rate_unguided")), _percent(after.get("attack_success_rate_unguided"))),
        ("backdoor on clean prompts", _percent(before.get("clean_false_positive_rate")), _percent(after.get("clean_false_positive_rate"))),
        ("clean accuracy", _percent(before.get("clean_accuracy")), _percent(after.get("clean_accuracy"))),
        ("trigger influence", _number(before.get("trigger_influence")), _number(after.get("trigger_influence"))),
    ]
    lines = [f"{'metric':<28}{'before':>10}{'after':>10}", "-" * 48]
    lines += [f"{name:<28}{first:>10}{second:>10}" for name, first, second in rows]
    lines.append("-" * 48)
    lines.append(f"removal rate: {_percent(report.get('removal_rate'))}   clean PSNR: {_number(fidelity.get('psnr_db'), 1)} dB   clean SSIM: {_number(fidelity.get('ssim'), 3)}")
    return "\n".join(lines)


def run_seal(args: argparse.Namespace) -> int:
    from core.sealing import seal

    try:
        spec = read_spec(args.spec)
        if args.steps is not None:
            spec = JobSpec.model_validate({**spec.model_dump(), "training": {**spec.training.model_dump(), "steps": args.steps}})
        bar = ProgressBar()
        try:
            result = seal(args.model, spec, args.out, device=args.device, on_progress=bar)
        finally:
            bar.close()
    except SealerError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    print(format_summary(result.summary))
    print(f"report:  {args.out / 'report.html'}")
    print(f"samples: {args.out / 'samples.png'}")
    print(f"weights: {result.artifacts[0]}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from core.checkpoint import load_checkpoint
    from core.engine.unlearner import resolve_device
    from core.evaluation.evaluate import evaluate_model
    from core.evaluation.report import render_grid

    try:
        spec = read_spec(args.spec)
        device = resolve_device(args.device)
        loaded = load_checkpoint(args.model, base_model=Path(spec.base_model) if spec.base_model else None)
        loaded.components.unet.to(device)
        bar = ProgressBar()
        try:
            result = evaluate_model(loaded.components, spec, device=device, on_batch=lambda done, total: bar(_Step("evaluating", done, total)))
        finally:
            bar.close()
    except SealerError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2

    args.out.mkdir(parents=True, exist_ok=True)
    figures = {"evaluation": result.to_dict(), "spec": spec.model_dump(mode="json")}
    (args.out / "evaluation.json").write_text(json.dumps(figures, indent=2, allow_nan=False))
    columns = [("clean", result.grid_clean)] + [(f"trigger {index + 1}", trigger.grid_images) for index, trigger in enumerate(result.triggers)]
    render_grid(result.grid_prompts, columns).save(args.out / "samples.png")
    print(f"attack success (guided):   {_percent(result.attack_success_rate)}")
    print(f"attack success (unguided): {_percent(result.attack_success_rate_unguided)}")
    print(f"backdoor on clean prompts: {_percent(result.clean_false_positive_rate)}")
    print(f"clean accuracy:            {_percent(result.clean_accuracy)}")
    print(f"trigger influence:         {_number(result.trigger_influence)}")
    print(f"figures: {args.out / 'evaluation.json'}\nsamples: {args.out / 'samples.png'}")
    return 0


class _Step:
    def __init__(self, phase: str, step: int, total: int) -> None:
        self.phase, self.step, self.total = phase, step, total
