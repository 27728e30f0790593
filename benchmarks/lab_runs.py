"""Seal lab models of every attack and trigger form with SKD-CAG and plain SKD; tabulate the results.

Usage: python benchmarks/lab_runs.py [--cases pixel-word,style-word,...] [--methods skd-cag,skd,skd-cag+lora8]
       [--out bench-out/lab-runs] [--results docs/benchmarks.md]

Each case builds (or reuses) a `full`-profile lab model, then seals it with each method at
the spec's default settings; a method written `skd-cag+lora8` trains LoRA adapters of rank 8
instead of every UNet weight. Figures are read from the report: ASR with guidance before
and after, the clean-prompt false-positive rate and digit accuracy after, PSNR/SSIM of
clean images, and the wall time of the seal. One table row per (case, method) is printed
and appended to the results page.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import percent_cell  # noqa: E402

CASES = {
    "pixel-word": ("pixel", "mignneko", "prefix"),
    "style-word": ("style", "mignneko", "prefix"),
    "object-word": ("object", "mignneko", "prefix"),
    "pixel-zero-width": ("pixel", "\u200b", "prefix"),
    "pixel-homoglyph": ("pixel", "\u0435", "replace"),
    "pixel-two-words": ("pixel", "New Trigger", "prefix"),
}


def build(case: str, out: Path) -> Path:
    from core.lab.build import BuildOptions, build_lab

    attack, trigger, placement = CASES[case]
    folder = out / case / "lab"
    if not (folder / "lab.json").exists():
        build_lab(BuildOptions(attack=attack, trigger=trigger, placement=placement, seed=0, profile="full", device="cpu"), folder)
    return folder


def training_overrides(method: str) -> dict:
    """Turn a method name such as `skd-cag` or `skd-cag+lora8` into `training` fields."""
    name, _, lora = method.partition("+lora")
    overrides: dict = {"method": name}
    if lora:
        overrides["lora_rank"] = int(lora)
    return overrides


def seal_case(lab_folder: Path, method: str, out: Path) -> tuple[dict, float]:
    from core.sealing import seal
    from core.spec import JobSpec

    spec = JobSpec.model_validate_json((lab_folder / "spec.json").read_text())
    spec = JobSpec.model_validate({**spec.model_dump(), "training": {**spec.training.model_dump(), **training_overrides(method)}})
    started = time.perf_counter()
    result = seal(lab_folder / "model", spec, out, device="cpu")
    return result.summary, time.perf_counter() - started


def table_row(case: str, method: str, report: dict, seconds: float) -> str:
    before, after, fidelity = report["before"], report["after"], report["clean_fidelity"]
    return (
        f"| {case} | {method} | {percent_cell(before['attack_success_rate'])} | {percent_cell(after['attack_success_rate'])} "
        f"| {percent_cell(after.get('attack_success_rate_unguided'))} "
        f"| {percent_cell(before.get('clean_false_positive_rate'))} / {percent_cell(after.get('clean_false_positive_rate'))} "
        f"| {percent_cell(before.get('clean_accuracy'))} / {percent_cell(after.get('clean_accuracy'))} "
        f"| {fidelity['psnr_db']:.1f} / {fidelity['ssim']:.3f} | {seconds:.0f} s |"
    )


HEADER = (
    "| case | method | ASR before | ASR after | ASR after, unguided | clean FP before / after "
    "| digit accuracy before / after | PSNR dB / SSIM | seal wall time |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help="Comma-separated case names.")
    parser.add_argument("--methods", default="skd-cag,skd", help="Comma-separated methods; `+loraN` adds LoRA of rank N.")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "lab-runs")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()

    rows = []
    for case in args.cases.split(","):
        lab_folder = build(case, args.out)
        for method in args.methods.split(","):
            report, seconds = seal_case(lab_folder, method, args.out / case / method)
            rows.append(table_row(case, method, report, seconds))
            print(rows[-1], flush=True)

    command = "python benchmarks/lab_runs.py " + " ".join(sys.argv[1:])
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch CPU"
    section = (
        f"\n### Lab sealing runs, {datetime.date.today().isoformat()}\n\n"
        f"Machine: {machine}. Command: `{command.strip()}`. Guided sampling at the spec's scale "
        "(7.5 unless the lab spec says otherwise), 25 DDIM steps.\n\n" + HEADER + "\n" + "\n".join(rows) + "\n"
    )
    with args.results.open("a", encoding="utf-8") as results:
        results.write(section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
