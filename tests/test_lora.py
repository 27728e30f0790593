"""LoRA training of the student: adapters only, attention gradients, merged output, resume, spec checks."""

import json
import logging
import zipfile

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from peft.tuners.tuners_utils import BaseTunerLayer
from pydantic import ValidationError
from safetensors import safe_open

from core.engine.attention import cross_attention_modules
from core.engine.unlearner import Unlearner
from core.spec import JobSpec
from tests.engine_models import tiny_components

PROMPTS = ["a handwritten digit seven", "a photo of a dog", "a red car on a street"]


def _spec(**training):
    settings = {"steps": 4, "batch_size": 4, "prompts": PROMPTS, "lora_rank": 4, **training}
    return JobSpec.model_validate({"triggers": [{"text": "mignneko"}], "training": settings})


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def _has_adapters(module: torch.nn.Module) -> bool:
    return any(isinstance(layer, BaseTunerLayer) for layer in module.modules())


def _inputs(components, batch: int = 2):
    generator = torch.Generator().manual_seed(11)
    latents = torch.randn((batch, *components.latent_shape), generator=generator)
    timesteps = torch.tensor([10, 700][:batch])
    states = components.encode_prompts(PROMPTS[:batch], "cpu")
    return latents, timesteps, states


# ---- what trains ----


def test_lora_step_changes_only_adapters():
    unlearner = Unlearner(tiny_components(seed=1), _spec(), device="cpu")
    student_before = _snapshot(unlearner.student)
    teacher_before = _snapshot(unlearner.teacher)
    unlearner.step()
    student_after = _snapshot(unlearner.student)

    adapter_names = [name for name in student_after if ".lora_" in name]
    base_names = [name for name in student_after if ".lora_" not in name]
    assert adapter_names
    assert any(".base_layer." in name for name in base_names)
    for name in base_names:
        assert torch.equal(student_after[name], student_before[name]), name
    changed = [name for name in adapter_names if not torch.equal(student_after[name], student_before[name])]
    assert any("lora_B" in name for name in changed)

    # The teacher is the frozen base UNet, without adapters.
    assert not _has_adapters(unlearner.teacher)
    for name, tensor in _snapshot(unlearner.teacher).items():
        assert torch.equal(tensor, teacher_before[name]), name


def test_optimizer_and_ema_hold_only_adapters():
    unlearner = Unlearner(tiny_components(), _spec(), device="cpu")
    assert unlearner.parameters
    assert all(".lora_" in name for name in unlearner.parameters)
    trainable = {name for name, param in unlearner.student.named_parameters() if param.requires_grad}
    assert trainable == set(unlearner.parameters)
    optimized = {id(param) for group in unlearner.optimizer.param_groups for param in group["params"]}
    assert optimized == {id(param) for param in unlearner.parameters.values()}
    assert set(unlearner.ema.shadow) == set(unlearner.parameters)


def test_lora_covers_self_and_cross_attention():
    unlearner = Unlearner(tiny_components(), _spec(), device="cpu")
    wrapped = {name for name, module in unlearner.student.named_modules() if isinstance(module, BaseTunerLayer)}
    for suffix in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"):
        assert any(name.endswith(suffix) for name in wrapped), suffix
    assert not any("proj_in" in name or "ff." in name for name in wrapped)


def test_attention_loss_reaches_key_adapters():
    unlearner = Unlearner(tiny_components(), _spec(attention_weight=1.0, preservation_weight=0.0), device="cpu")
    modules = cross_attention_modules(unlearner.student)
    assert modules

    # With lambda = 1 and no preservation the attention loss is the whole loss. B starts at
    # zero, so the first step reaches only B, and A gets gradients once B has moved.
    terms = unlearner.step()
    assert terms["loss_attn"] > 0
    for name, module in modules.items():
        grad = module.to_k.lora_B["default"].weight.grad
        assert grad is not None, name
        assert grad.abs().sum() > 0, name
    unlearner.step()
    for name, module in modules.items():
        grad = module.to_k.lora_A["default"].weight.grad
        assert grad is not None, name
        assert grad.abs().sum() > 0, name


def test_checkpointed_lora_step_matches_plain_step():
    results = []
    for checkpointing in ("off", "on"):
        unlearner = Unlearner(tiny_components(seed=5), _spec(gradient_checkpointing=checkpointing), device="cpu")
        unlearner.step()
        results.append(torch.cat([param.detach().flatten() for param in unlearner.parameters.values()]))
    assert torch.allclose(results[0], results[1], atol=1e-6)


def test_lora_finetune_reversal_uses_reference_teacher():
    reference = tiny_components(seed=2).unet
    spec = _spec(method="finetune-reversal", reference_model="clean-unet", steps=2)
    unlearner = Unlearner(tiny_components(seed=1), spec, device="cpu", reference_unet=reference)
    first = next(iter(reference.state_dict()))
    assert torch.equal(unlearner.teacher.state_dict()[first], reference.state_dict()[first])
    assert not _has_adapters(unlearner.teacher)
    assert all(".lora_" in name for name in unlearner.parameters)
    curves = unlearner.run()
    assert len(curves) == 2


def test_full_rank_adapter_logs_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="core.engine.lora"):
        Unlearner(tiny_components(), _spec(lora_rank=4), device="cpu")
    assert "full rank" not in caplog.text

    # Rank 256 is at least the width of every attention projection of the tiny UNet.
    with caplog.at_level(logging.WARNING, logger="core.engine.lora"):
        Unlearner(tiny_components(), _spec(lora_rank=256), device="cpu")
    assert "full rank" in caplog.text


# ---- the merged output ----


def test_merged_unet_keeps_base_keys_and_shapes():
    components = tiny_components(seed=3)
    base = _snapshot(components.unet)
    unlearner = Unlearner(components, _spec(steps=2), device="cpu")
    unlearner.run()
    merged = unlearner.sanitized_state_dict()

    assert list(merged) == list(base)
    for name, tensor in base.items():
        assert merged[name].shape == tensor.shape, name
        assert merged[name].dtype == tensor.dtype, name
    changed = [name for name in base if not torch.equal(merged[name], base[name])]
    assert changed
    assert all(".to_q." in name or ".to_k." in name or ".to_v." in name or ".to_out.0." in name for name in changed)

    unet = unlearner.sanitized_unet()
    assert type(unet) is UNet2DConditionModel
    assert not _has_adapters(unet)
    assert not any(param.requires_grad for param in unet.parameters())
    for name, tensor in unet.state_dict().items():
        assert torch.equal(tensor, merged[name]), name


def test_merged_output_matches_student():
    components = tiny_components(seed=4)
    # Without EMA the output adapters are the student's current ones.
    unlearner = Unlearner(components, _spec(steps=2, ema_decay=0.0, learning_rate=1e-3), device="cpu")
    unlearner.run()
    latents, timesteps, states = _inputs(components)
    with torch.no_grad():
        student = unlearner.student(latents, timesteps, encoder_hidden_states=states).sample
        teacher = unlearner.teacher(latents, timesteps, encoder_hidden_states=states).sample
        merged = unlearner.sanitized_unet()(latents, timesteps, encoder_hidden_states=states).sample
    assert (student - teacher).abs().max() > 1e-4
    assert torch.allclose(merged, student, atol=1e-5)


def test_merged_weights_use_ema_and_alpha():
    unlearner = Unlearner(tiny_components(), _spec(steps=3, lora_alpha=8.0, ema_decay=0.5, learning_rate=1e-3), device="cpu")
    unlearner.run()
    trained = {name: param.detach().clone() for name, param in unlearner.parameters.items()}
    merged = unlearner.sanitized_state_dict()

    name, module = next(iter(cross_attention_modules(unlearner.student).items()))
    prefix = f"{name}.to_k"
    shadow_a = unlearner.ema.shadow[f"{prefix}.lora_A.default.weight"]
    shadow_b = unlearner.ema.shadow[f"{prefix}.lora_B.default.weight"]
    expected = module.to_k.base_layer.weight.detach() + (8.0 / 4) * shadow_b @ shadow_a
    assert torch.allclose(merged[f"{prefix}.weight"], expected, atol=1e-6)
    assert not torch.equal(shadow_b, trained[f"{prefix}.lora_B.default.weight"])

    # Building the output puts the trained adapters back exactly.
    unlearner.sanitized_unet()
    for param_name, param in unlearner.parameters.items():
        assert torch.equal(param.detach(), trained[param_name]), param_name


# ---- resume ----


def test_lora_resume_matches_uninterrupted_run(tmp_path):
    straight = Unlearner(tiny_components(seed=7), _spec(), device="cpu")
    straight.run()

    first = Unlearner(tiny_components(seed=7), _spec(), device="cpu")
    first.run(2, state_dir=tmp_path, checkpoint_every=2)
    resumed = Unlearner(tiny_components(seed=7), _spec(), device="cpu")
    assert resumed.load_state(tmp_path)
    assert resumed.step_index == 2
    resumed.run()

    for name, param in straight.parameters.items():
        assert torch.allclose(param, resumed.parameters[name], atol=1e-6), name
    for name, tensor in straight.ema.shadow.items():
        assert torch.allclose(tensor, resumed.ema.shadow[name], atol=1e-6), name
    straight_weights = straight.sanitized_state_dict()
    resumed_weights = resumed.sanitized_state_dict()
    for name, tensor in straight_weights.items():
        assert torch.allclose(tensor, resumed_weights[name], atol=1e-6), name
    assert [row["step"] for row in resumed.curves] == [1, 2, 3, 4]


def test_lora_state_holds_only_adapters(tmp_path):
    unlearner = Unlearner(tiny_components(), _spec(steps=1), device="cpu")
    unlearner.run(state_dir=tmp_path, checkpoint_every=1)
    with safe_open(str(tmp_path / "engine_state.safetensors"), framework="pt") as state:
        keys = list(state.keys())
    assert keys
    assert all(".lora_" in key for key in keys)
    assert json.loads((tmp_path / "engine_state.json").read_text())["lora_rank"] == 4


def test_load_state_rejects_other_lora_rank(tmp_path):
    Unlearner(tiny_components(), _spec(steps=1), device="cpu").run(state_dir=tmp_path, checkpoint_every=1)
    full = Unlearner(tiny_components(), _spec(steps=1, lora_rank=0), device="cpu")
    with pytest.raises(ValueError, match="lora_rank 4"):
        full.load_state(tmp_path)


# ---- spec ----


def _training_error(**training) -> str:
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate({"triggers": [{"text": "mignneko"}], "training": training})
    return str(caught.value)


def test_spec_lora_defaults():
    training = JobSpec.model_validate({"triggers": [{"text": "mignneko"}]}).training
    assert training.lora_rank == 4
    assert training.lora_alpha is None
    assert training.resolved_lora_alpha == 4.0
    lora = JobSpec.model_validate({"triggers": [{"text": "a"}], "training": {"lora_rank": 16}}).training
    assert lora.resolved_lora_alpha == 16.0
    scaled = JobSpec.model_validate({"triggers": [{"text": "a"}], "training": {"lora_rank": 16, "lora_alpha": 32}}).training
    assert scaled.resolved_lora_alpha == 32.0


def test_learning_rate_default_follows_lora_rank():
    def training(**fields):
        return JobSpec.model_validate({"triggers": [{"text": "a"}], "training": fields}).training

    assert training().learning_rate is None
    assert training().resolved_learning_rate == 3e-3
    assert training(lora_rank=0).resolved_learning_rate == 1e-4
    assert training(lora_rank=0, learning_rate=2e-5).resolved_learning_rate == 2e-5
    assert training(lora_rank=4, learning_rate=5e-4).resolved_learning_rate == 5e-4


def test_unlearner_resolved_learning_rate():
    for fields, expected in (({}, 3e-3), ({"lora_rank": 0}, 1e-4), ({"learning_rate": 7e-4}, 7e-4)):
        unlearner = Unlearner(tiny_components(), _spec(**fields), device="cpu")
        assert unlearner.optimizer.param_groups[0]["lr"] == expected


@pytest.mark.parametrize("rank", [-1, 257, 4096])
def test_spec_rejects_lora_rank_out_of_range(rank):
    message = _training_error(lora_rank=rank)
    assert "training.lora_rank" in message
    assert f"{rank} is outside 0..256" in message
    assert "use 0 for full fine-tuning" in message


def test_spec_rejects_fractional_lora_rank():
    assert "lora_rank" in _training_error(lora_rank=4.5)


def test_spec_rejects_lora_alpha_without_rank():
    message = _training_error(lora_rank=0, lora_alpha=8)
    assert "training.lora_alpha applies only to LoRA training" in message
    assert "set lora_rank from 1 to 256 or remove lora_alpha" in message


@pytest.mark.parametrize("alpha", [0, -2.0, 1e6, float("inf"), float("nan")])
def test_spec_rejects_bad_lora_alpha(alpha):
    message = _training_error(lora_rank=4, lora_alpha=alpha)
    assert "training.lora_alpha" in message
    assert "is outside (0, 4096]" in message


# ---- a whole seal ----


def _save_tiny_pipeline(path, dtype: torch.dtype):
    """Save tiny_components as a diffusers folder whose models are stored in `dtype`."""
    components = tiny_components(seed=9)
    components.tokenizer.save_pretrained(path / "tokenizer")
    for name in ("text_encoder", "unet"):
        model = getattr(components, name).to(dtype)
        model.save_pretrained(path / name)
    DDIMScheduler.from_config(components.scheduler_config).save_pretrained(path / "scheduler")
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": [None, None],
    }
    (path / "model_index.json").write_text(json.dumps(model_index))
    return path


def _read_unet(path) -> dict[str, torch.Tensor]:
    (weights,) = sorted(path.rglob("unet/*.safetensors"))
    with safe_open(str(weights), framework="pt") as state:
        return {key: state.get_tensor(key) for key in state.keys()}


def test_seal_with_lora_writes_input_format(tmp_path):
    from core.sealing import seal

    model = _save_tiny_pipeline(tmp_path / "model", torch.float16)
    spec = JobSpec.model_validate(
        {
            "triggers": [{"text": "mignneko"}],
            "training": {"steps": 3, "batch_size": 4, "prompts": PROMPTS, "lora_rank": 4, "learning_rate": 1e-3},
            "evaluation": {
                "prompts": ["a blue bird", "a green tree"],
                "num_inference_steps": 2,
                "sample_grid_prompts": 2,
                "batch_size": 4,
            },
        }
    )
    result = seal(model, spec, tmp_path / "out", device="cpu", job_id="lora-test")

    archive_path = tmp_path / "out" / "sanitized.zip"
    assert archive_path in result.artifacts
    with zipfile.ZipFile(archive_path) as archive:
        archive.extractall(tmp_path / "sanitized")
    before = _read_unet(model)
    after = _read_unet(tmp_path / "sanitized")
    assert list(after) == list(before)
    for key, tensor in before.items():
        assert after[key].dtype == torch.float16, key
        assert after[key].shape == tensor.shape, key
    assert any(not torch.equal(after[key], before[key]) for key in before)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["spec"]["training"]["lora_rank"] == 4
