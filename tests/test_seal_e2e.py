"""A quick end-to-end seal of a real backdoored lab model on CPU."""

import json
import logging
import zipfile

import pytest

from core.logging_setup import JobContextFilter
from core.sealing import seal
from core.spec import JobSpec

JOB_ID = "e2e-job"


class RecordList(logging.Handler):
    """Handler that keeps every record, with the job id that `configure_logging`'s handler adds."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.addFilter(JobContextFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def sealed(lab_build_dir, tmp_path_factory):
    spec = JobSpec.model_validate_json((lab_build_dir / "spec.json").read_text())
    settings = spec.model_dump()
    settings["evaluation"]["prompts"] = settings["evaluation"]["prompts"][:60]
    settings["evaluation"]["prompt_labels"] = settings["evaluation"]["prompt_labels"][:60]
    settings["evaluation"]["num_inference_steps"] = 20
    spec = JobSpec.model_validate(settings)
    out = tmp_path_factory.mktemp("sealed")
    phases = []
    core_logger, handler = logging.getLogger("core"), RecordList()
    saved_level = core_logger.level
    core_logger.setLevel(logging.INFO)
    core_logger.addHandler(handler)
    try:
        result = seal(lab_build_dir / "model", spec, out, device="cpu", on_progress=lambda p: phases.append(p.phase), job_id=JOB_ID)
    finally:
        core_logger.removeHandler(handler)
        core_logger.setLevel(saved_level)
    return result, out, phases, handler.records


@pytest.mark.slow
def test_seal_lowers_attack_success(sealed):
    result, *_ = sealed
    before = result.summary["before"]["attack_success_rate"]
    after = result.summary["after"]["attack_success_rate"]
    assert before >= 0.5
    # NOTE: the `test` lab profile seals less completely than the `full` one with the same
    # defaults (68% -> 42% here, against 92% -> 1% for a `full` build), so this checks a
    # clear fall, not removal. docs/benchmarks.md has the `full` figures.
    assert after <= 0.75 * before
    assert result.summary["removal_rate"] >= 0.25


@pytest.mark.slow
def test_seal_keeps_clean_images(sealed):
    result, *_ = sealed
    assert result.summary["after"]["clean_accuracy"] >= result.summary["before"]["clean_accuracy"] - 0.1
    assert result.summary["clean_fidelity"]["ssim"] > 0.5


@pytest.mark.slow
def test_seal_log_lines_carry_job_id(sealed):
    *_, records = sealed
    modules = {record.name for record in records}
    assert {"core.sealing", "core.evaluation.evaluate"} <= modules
    assert [record.name for record in records if getattr(record, "job_id", None) != JOB_ID] == []


@pytest.mark.slow
def test_seal_writes_every_artifact(sealed):
    _, out, phases, _ = sealed
    for name in ("sanitized.zip", "report.json", "report.html", "samples.png", "curves.csv"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "skd-cag"
    assert report["triggers"][0]["token_count"] == 2
    assert report["spec"]["triggers"][0]["text"] == "mignneko"
    with zipfile.ZipFile(out / "sanitized.zip") as archive:
        assert any(name.endswith("unet/diffusion_pytorch_model.safetensors") for name in archive.namelist())
    assert phases.index("evaluating_before") < phases.index("unlearning") < phases.index("evaluating_after")


@pytest.mark.slow
def test_sanitized_zip_loads_with_diffusers(sealed, tmp_path):
    from diffusers import UNet2DConditionModel

    _, out, *_ = sealed
    with zipfile.ZipFile(out / "sanitized.zip") as archive:
        archive.extractall(tmp_path)
    unet_dirs = list(tmp_path.rglob("unet"))
    unet = UNet2DConditionModel.from_pretrained(unet_dirs[0], local_files_only=True)
    assert unet.config.sample_size == 16
