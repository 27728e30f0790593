"""Job spec validation: every bad field is rejected with its name and a fix."""

import base64
import io

import pytest
from PIL import Image
from pydantic import ValidationError

from core.spec import JobSpec


def _png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _error(payload: dict) -> str:
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(payload)
    return str(caught.value)


def test_minimal_spec_gets_defaults():
    spec = JobSpec.model_validate({"triggers": [{"text": "mignneko"}]})
    assert spec.training.method == "skd-cag"
    assert spec.triggers[0].placement == "prefix"
    assert spec.training.adam_beta1 == 0.9
    assert spec.training.adam_beta2 == 0.999
    assert spec.training.weight_decay == 0.01
    assert spec.training.steps == 300


def test_style_attack_default_steps():
    style_attack = {"kind": "style", "style": "grayscale"}
    spec = JobSpec.model_validate({"triggers": [{"text": "mignneko"}], "attack": style_attack})
    assert spec.training.steps == 150

    # A reloaded spec keeps the count, and a count the user gives wins.
    assert JobSpec.model_validate_json(spec.model_dump_json()).training.steps == 150
    chosen = JobSpec.model_validate({"triggers": [{"text": "mignneko"}], "attack": style_attack, "training": {"steps": 300}})
    assert chosen.training.steps == 300
    object_attack = {"kind": "object", "source_class": "seven", "target_class": "one"}
    object_spec = JobSpec.model_validate({"triggers": [{"text": "mignneko"}], "attack": object_attack})
    assert object_spec.training.steps == 300


def test_no_triggers_rejected():
    assert "triggers" in _error({"triggers": []})


def test_too_many_triggers_rejected():
    assert "triggers" in _error({"triggers": [{"text": f"t{i}"} for i in range(9)]})


def test_trigger_over_length_limit_rejected():
    assert "at most 64" in _error({"triggers": [{"text": "x" * 65}]})


def test_duplicate_trigger_rejected():
    assert "listed twice" in _error({"triggers": [{"text": "a"}, {"text": "a"}]})


def test_unknown_field_rejected():
    message = _error({"triggers": [{"text": "a"}], "trianing": {}})
    assert "trianing" in message
    assert "Extra inputs are not permitted" in message


def test_unknown_placement_rejected():
    assert "placement" in _error({"triggers": [{"text": "a", "placement": "middle"}]})


def test_unknown_attack_kind_rejected():
    assert "kind" in _error({"triggers": [{"text": "a"}], "attack": {"kind": "audio"}})


def test_out_of_range_training_values_rejected():
    for field, value in (("steps", 0), ("batch_size", 0), ("batch_size", 10_000), ("learning_rate", 1.0)):
        assert field in _error({"triggers": [{"text": "a"}], "training": {field: value}}), field


def test_replace_needs_single_homoglyph():
    assert "single homoglyph" in _error({"triggers": [{"text": "ab", "placement": "replace"}]})
    assert "no known Latin look-alike" in _error({"triggers": [{"text": "\u4e00", "placement": "replace"}]})
    spec = JobSpec.model_validate({"triggers": [{"text": "\u0435", "placement": "replace"}]})
    assert spec.triggers[0].replaces == "e"


def test_pixel_attack_needs_image_and_box():
    assert "patch_png_base64" in _error({"triggers": [{"text": "a"}], "attack": {"kind": "pixel"}})
    not_image = base64.b64encode(b"hello").decode()
    assert "not a readable image" in _error(
        {"triggers": [{"text": "a"}], "attack": {"kind": "pixel", "patch_png_base64": not_image, "box": [0, 0, 2, 2]}}
    )
    assert "empty or negative" in _error(
        {"triggers": [{"text": "a"}], "attack": {"kind": "pixel", "patch_png_base64": _png(), "box": [3, 0, 2, 2]}}
    )


def test_evaluation_prompts_must_be_held_out():
    message = _error(
        {"triggers": [{"text": "a"}], "training": {"prompts": ["a cat"]}, "evaluation": {"prompts": ["a cat"]}}
    )
    assert "held out" in message


def test_labels_must_match_prompts():
    assert "one label per prompt" in _error(
        {"triggers": [{"text": "a"}], "evaluation": {"prompts": ["a", "b"], "prompt_labels": ["one"]}}
    )


def test_finetune_reversal_needs_reference():
    assert "reference_model" in _error({"triggers": [{"text": "a"}], "training": {"method": "finetune-reversal"}})
