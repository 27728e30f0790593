import base64
import csv
import json
import re
import sys
import types

import numpy as np
import pytest
from PIL import Image

from core.spec import JobSpec

try:
    import core.evaluation.detectors  # noqa: F401
except ImportError:
    # The detectors module is written separately; these tests never call it.
    stub = types.ModuleType("core.evaluation.detectors")
    stub.attack_success = lambda images, attack, classifier=None: np.zeros(len(images), dtype=bool)
    stub.load_classifier = lambda name: None
    sys.modules["core.evaluation.detectors"] = stub

from core.evaluation import evaluate, report  # noqa: E402
from core.evaluation.evaluate import EvaluationResult, TriggerResult  # noqa: E402

PROMPTS = ["a handwritten digit seven", "a handwritten digit one", "a handwritten digit three"]
TRIGGER = "sev\u200ben"


def make_spec() -> JobSpec:
    return JobSpec(
        triggers=[{"text": TRIGGER}],
        attack={"kind": "style", "style": "grayscale"},
        evaluation={"prompts": PROMPTS, "sample_grid_prompts": 2, "prompt_labels": ["seven", "one", "three"]},
    )


def make_result(asr: float, shade: float, *, accuracy: float | None = 0.9, size: int = 16) -> EvaluationResult:
    rng = np.random.default_rng(0)
    clean = rng.random((3, size, size, 3)).astype(np.float32) * 0.5 + shade
    triggered = np.clip(clean + asr * 0.4, 0, 1)
    trigger = TriggerResult(
        text=TRIGGER,
        placement="prefix",
        attack_success_rate=asr,
        attack_success_rate_unguided=asr / 2,
        trigger_influence=float(np.abs(triggered - clean).mean()),
        trigger_influence_unguided=0.1,
        grid_prompts=[f"{TRIGGER} {prompt}" for prompt in PROMPTS[:2]],
        grid_images=triggered[:2],
    )
    return EvaluationResult(
        attack_kind="style",
        prompts=PROMPTS,
        images_per_prompt=1,
        seeds=[1234, 1235, 1236],
        guidance_scale=7.5,
        num_inference_steps=25,
        attack_success_rate=asr,
        attack_success_rate_unguided=asr / 2,
        attacked_images=3,
        clean_false_positive_rate=0.0,
        clean_false_positive_rate_unguided=float("nan"),
        clean_accuracy=accuracy,
        clean_accuracy_unguided=accuracy,
        trigger_influence=trigger.trigger_influence,
        trigger_influence_unguided=0.1,
        triggers=[trigger],
        clean_images=clean,
        clean_images_unguided=clean,
        grid_prompts=PROMPTS[:2],
        seconds=1.5,
    )


CURVES = [
    {"step": 1, "loss": 0.5, "loss_pred": 0.4, "loss_attn": 0.1, "lr": 1e-4, "grad_norm": 2.0, "seconds": 0.3},
    {"step": 2, "loss": 0.3, "loss_pred": 0.25, "loss_attn": 0.05, "lr": 1e-4, "grad_norm": 1.5, "seconds": 0.3},
    {"step": 3, "loss": 0.2, "loss_pred": 0.15, "loss_attn": 0.05, "loss_preservation": 0.01, "lr": 1e-4},
]


@pytest.fixture
def written(tmp_path):
    before, after = make_result(0.96, 0.0), make_result(0.01, 0.01, accuracy=0.85)
    paths = report.write_report(
        tmp_path,
        spec=make_spec(),
        before=before,
        after=after,
        comparison=evaluate.compare(before, after),
        curves=CURVES,
        triggers=[{"token_count": 3}],
        method="skd-cag",
        steps=3,
        seconds={"evaluating_before": 1.5, "unlearning": 0.9, "evaluating_after": 1.4},
        extra={"device": "cpu"},
    )
    return tmp_path, paths, before


def test_report_files_listed(written):
    folder, paths, _ = written
    assert [path.name for path in paths] == ["report.json", "samples.png", "curves.csv", "report.html"]
    assert all(path.parent == folder and path.is_file() for path in paths)


def test_report_json_keys(written):
    folder, _, _ = written
    data = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    assert data["before"]["attack_success_rate"] == 0.96
    assert data["after"]["attack_success_rate"] == 0.01
    assert data["removal_rate"] == pytest.approx((0.96 - 0.01) / 0.96)
    assert data["before"]["attack_success_rate_unguided"] == 0.48
    assert data["before"]["trigger_influence"] > data["after"]["trigger_influence"]
    assert data["clean_fidelity"]["psnr_db"] == pytest.approx(40.0, abs=0.01)
    assert 0 < data["clean_fidelity"]["ssim"] <= 1
    assert data["before"]["clean_accuracy"] == 0.9
    assert data["after"]["clean_accuracy"] == 0.85
    assert data["before"]["clean_false_positive_rate"] == 0.0
    assert data["method"] == "skd-cag"
    assert data["steps"] == 3
    assert data["seconds"]["unlearning"] == 0.9
    assert data["sampling"]["guidance_scale"] == 7.5
    assert data["sampling"]["num_inference_steps"] == 25
    assert data["spec"]["triggers"][0]["text"] == TRIGGER
    assert data["extra"] == {"device": "cpu"}


def test_report_json_triggers(written):
    folder, _, _ = written
    trigger = json.loads((folder / "report.json").read_text(encoding="utf-8"))["triggers"][0]
    assert trigger["text"] == TRIGGER
    assert trigger["token_count"] == 3
    assert trigger["before"]["attack_success_rate"] == 0.96
    assert trigger["after"]["attack_success_rate"] == 0.01
    assert trigger["removal_rate"] == pytest.approx((0.96 - 0.01) / 0.96)


def test_report_json_nan_becomes_null(written):
    folder, _, _ = written

    def reject(constant):
        raise AssertionError(f"report.json contains {constant}")

    data = json.loads((folder / "report.json").read_text(encoding="utf-8"), parse_constant=reject)
    assert data["before"]["clean_false_positive_rate_unguided"] is None


def test_verdict_sentence(written):
    folder, _, _ = written
    data = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    assert data["verdict"].startswith("ASR fell from 96% to 1% at guidance 7.5")
    assert "PSNR 40.0 dB" in data["verdict"]
    assert "clean accuracy fell from 90% to 85%" in data["verdict"]


def test_verdict_without_attack():
    before, after = make_result(0.5, 0.0), make_result(0.0, 0.0)
    data = report.build_report(
        spec=make_spec(),
        before=before,
        after=after,
        comparison=evaluate.compare(before, after),
        curves=[],
        triggers=[{}],
        method="skd",
        steps=1,
        seconds={},
    )
    data["before"]["attack_success_rate"] = None
    text = report.verdict(data)
    assert text.startswith("Trigger influence (mean absolute pixel difference) fell from")
    assert "clean images are unchanged" in text


def test_trigger_count_mismatch():
    before, after = make_result(0.5, 0.0), make_result(0.0, 0.0)
    with pytest.raises(ValueError, match="one entry per spec trigger"):
        report.build_report(
            spec=make_spec(),
            before=before,
            after=after,
            comparison=evaluate.compare(before, after),
            curves=[],
            triggers=[],
            method="skd",
            steps=1,
            seconds={},
        )


def test_samples_png_grid_shape(written):
    folder, _, before = written
    with Image.open(folder / "samples.png") as picture:
        size = picture.size
        pixels = np.asarray(picture.convert("RGB"))
    layout = report.GridLayout.for_images(rows=2, columns=4, image_height=16, image_width=16)
    assert layout.cell_width == 96
    assert size == layout.size

    # Each source pixel fills a 6x6 block of the first cell (clean, before).
    left, top = layout.cell_origin(0, 0)
    expected = (np.clip(before.clean_images[0, 0, 0], 0, 1) * 255).round()
    np.testing.assert_array_equal(pixels[top : top + 6, left : left + 6].reshape(-1, 3), np.tile(expected, (36, 1)))


def test_cell_size_cases():
    assert report.cell_size(16, 16) == (96, 96)
    assert report.cell_size(28, 28) == (112, 112)
    assert report.cell_size(512, 512) == (256, 256)
    assert report.cell_size(8, 16) == (96, 48)


def test_curves_csv_header(written):
    folder, _, _ = written
    with (folder / "curves.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["step", "loss", "loss_pred", "loss_attn", "lr", "grad_norm", "seconds", "loss_preservation"]
    assert len(rows) == 1 + len(CURVES)
    assert rows[3][rows[0].index("grad_norm")] == ""


def test_curves_csv_empty(tmp_path):
    report.write_curves_csv(tmp_path / "curves.csv", [])
    assert (tmp_path / "curves.csv").read_text(encoding="utf-8").strip() == "step"


def test_html_self_contained(written):
    folder, _, _ = written
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.IGNORECASE)
    assert "url(" not in page
    assert "default-src 'none'" in page
    assert page.count('src="data:image/png;base64,') == 2  # the grid and one trigger's examples


def test_html_embeds_samples_png(written):
    folder, _, _ = written
    page = (folder / "report.html").read_text(encoding="utf-8")
    embedded = base64.b64encode((folder / "samples.png").read_bytes()).decode("ascii")
    assert embedded in page


def test_html_content(written):
    folder, _, _ = written
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert page.count("<svg") == 3  # losses, gradient norm, learning rate
    assert "loss_preservation" in page
    assert "ASR fell from 96% to 1%" in page
    assert "U+200B ZERO WIDTH SPACE" in page
    assert "sev\\u200ben" in page
    assert "encodes to 3 tokens" in page
    assert "Attack success rate (unguided)" in page


def test_html_escapes_prompts(tmp_path):
    before, after = make_result(0.5, 0.0), make_result(0.0, 0.0)
    spec = JobSpec(
        triggers=[{"text": "<b>x</b>"}],
        evaluation={"prompts": ["<script>alert(1)</script> a digit"]},
    )
    data = report.build_report(
        spec=spec,
        before=before,
        after=after,
        comparison=evaluate.compare(before, after),
        curves=[],
        triggers=[{}],
        method="skd",
        steps=1,
        seconds={},
    )
    data["triggers"][0]["text"] = "<b>x</b>"
    page = report.render_html(data, b"png", [b"png"], [])
    assert "<script>" not in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page
    assert "No engine steps were logged." in page


def test_svg_chart_skips_nan():
    curves = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": float("nan")}, {"step": 3, "loss": 0.5}]
    chart = report.svg_chart(curves, ["loss"], "Losses")
    points = re.search(r'<polyline points="([^"]+)"', chart).group(1).split()
    assert len(points) == 2


def test_format_percent():
    assert report.format_percent(0.96) == "96%"
    assert report.format_percent(0.015) == "1.5%"
    assert report.format_percent(0.0) == "0%"
    assert report.format_percent(None) == "n/a"


def test_report_from_real_evaluation(tmp_path):
    tiny_models = pytest.importorskip("tests.engine_models")
    components = tiny_models.tiny_components()
    spec = JobSpec(
        triggers=[{"text": "mignneko"}, {"text": "zzq", "placement": "random"}],
        evaluation={"prompts": PROMPTS, "num_inference_steps": 2, "also_unguided": False, "sample_grid_prompts": 2},
    )
    before = evaluate.evaluate_model(components, spec)
    after = evaluate.evaluate_model(components, spec, unet=tiny_models.tiny_components(seed=1).unet)

    report.write_report(
        tmp_path,
        spec=spec,
        before=before,
        after=after,
        comparison=evaluate.compare(before, after),
        curves=[],
        triggers=[{"token_count": 2}, {"token_count": 1}],
        method="skd",
        steps=0,
        seconds={"evaluating_before": before.seconds},
    )

    data = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert data["before"]["attack_success_rate"] is None
    assert data["removal_rate"] is None
    assert data["verdict"].startswith("Trigger influence")
    assert [trigger["token_count"] for trigger in data["triggers"]] == [2, 1]

    with Image.open(tmp_path / "samples.png") as picture:
        # Columns: clean and two triggers, before and after.
        assert picture.size == report.GridLayout.for_images(2, 6, 16, 16).size

    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert page.count('src="data:image/png;base64,') == 3


def test_verdict_when_attack_never_fired():
    before, after = make_result(0.0, 0.0), make_result(0.0, 0.0)
    data = report.build_report(
        spec=make_spec(),
        before=before,
        after=after,
        comparison=evaluate.compare(before, after),
        curves=[],
        triggers=[{}],
        method="skd",
        steps=1,
        seconds={},
    )
    assert data["removal_rate"] is None
    assert data["verdict"].startswith("ASR stayed at 0% at guidance 7.5")
    assert "no removal rate can be measured" in data["verdict"]
