"""SKD-CAG engine: gradients, map separation, timestep weights, EMA, resumable state."""

import torch

from core.engine.attention import AttentionStore, cross_attention_modules, install_capture
from core.engine.ema import EMA
from core.engine.unlearner import Unlearner, timestep_weight
from core.spec import JobSpec
from tests.engine_models import tiny_components

PROMPTS = ["a handwritten digit seven", "a photo of a dog", "a red car on a street"]


def _spec(**training):
    # These tests check full fine-tuning, where every UNet weight trains (tests/test_lora.py covers the adapters).
    settings = {"steps": 4, "batch_size": 4, "prompts": PROMPTS, "lora_rank": 0, **training}
    return JobSpec.model_validate({"triggers": [{"text": "mignneko"}], "training": settings})


def _cross_attention_key_weights(unet):
    return {name: module.to_k.weight for name, module in cross_attention_modules(unet).items()}


def test_attention_loss_reaches_cross_attention_weights():
    unlearner = Unlearner(tiny_components(), _spec(attention_weight=1.0, preservation_weight=0.0), device="cpu")
    terms = unlearner.step()
    assert terms["loss_attn"] > 0

    # With lambda = 1 and no preservation, the attention loss is the whole loss.
    gradients = [weight.grad for weight in _cross_attention_key_weights(unlearner.student).values()]
    assert gradients
    assert all(grad is not None for grad in gradients)
    assert all(grad.abs().sum() > 0 for grad in gradients)


def test_attention_weight_changes_the_update():
    updates = []
    for weight in (0.0, 0.5):
        unlearner = Unlearner(tiny_components(seed=3), _spec(attention_weight=weight, ema_decay=0.0), device="cpu")
        before = {name: p.detach().clone() for name, p in unlearner.parameters.items()}
        unlearner.step()
        updates.append(torch.cat([(p.detach() - before[name]).flatten() for name, p in unlearner.parameters.items()]))
    cosine = torch.nn.functional.cosine_similarity(updates[0], updates[1], dim=0)
    assert cosine < 0.99


def test_teacher_and_student_stores_are_separate():
    unlearner = Unlearner(tiny_components(), _spec(), device="cpu")
    assert isinstance(unlearner.student_store, AttentionStore)
    assert unlearner.student_store is not unlearner.teacher_store

    # Each UNet's processors point at its own store.
    student_processors = {m.processor.store for m in cross_attention_modules(unlearner.student).values()}
    teacher_processors = {m.processor.store for m in cross_attention_modules(unlearner.teacher).values()}
    assert student_processors == {unlearner.student_store}
    assert teacher_processors == {unlearner.teacher_store}


def test_teacher_maps_carry_no_gradient_and_student_maps_do():
    components = tiny_components()
    unlearner = Unlearner(components, _spec(), device="cpu")
    latents = torch.randn(2, *components.latent_shape)
    timesteps = torch.tensor([10, 500])
    states = components.encode_prompts(PROMPTS[:2], "cpu")
    with torch.no_grad():
        _, teacher_maps = unlearner._forward(unlearner.teacher, latents, timesteps, states, unlearner.teacher_store, None)
    _, student_maps = unlearner._forward(unlearner.student, latents, timesteps, states, unlearner.student_store, None)
    assert not teacher_maps.requires_grad
    assert student_maps.requires_grad
    # Same weights, same input: the maps agree, yet they are different tensors.
    assert torch.allclose(teacher_maps, student_maps.detach(), atol=1e-5)
    assert teacher_maps.data_ptr() != student_maps.data_ptr()


def test_maps_are_attention_probabilities():
    # Maps rescaled by Nt made the attention loss Nt^2 larger, which wrecked clean images on the
    # lab models. The combined maps must stay probabilities that sum to 1 over the tokens.
    components = tiny_components()
    unlearner = Unlearner(components, _spec(), device="cpu")
    latents = torch.randn(2, *components.latent_shape)
    states = components.encode_prompts(PROMPTS[:2], "cpu")
    with torch.no_grad():
        _, maps = unlearner._forward(unlearner.teacher, latents, torch.tensor([10, 500]), states, unlearner.teacher_store, None)
    token_sums = maps.sum(dim=1)  # (B, Nt, R, R) -> (B, R, R)
    assert torch.allclose(token_sums, torch.ones_like(token_sums), atol=1e-4)


def test_no_maps_leak_from_checkpoint_recompute():
    unlearner = Unlearner(tiny_components(), _spec(gradient_checkpointing="on"), device="cpu")
    layers = len(cross_attention_modules(unlearner.student))
    components = unlearner.components
    latents = torch.randn(2, *components.latent_shape)
    states = components.encode_prompts(PROMPTS[:2], "cpu")
    store = unlearner.student_store
    with store.recording():
        prediction = unlearner.student(latents, torch.tensor([1, 2]), encoder_hidden_states=states).sample
    assert len(store.maps) == layers

    # Backward re-runs checkpointed forwards; nothing may be added to the store.
    loss = prediction.square().mean() + sum(maps.square().mean() for maps in store.maps)
    loss.backward()
    assert len(store.maps) == layers
    assert all(module.to_k.weight.grad is not None for module in cross_attention_modules(unlearner.student).values())


def test_checkpointed_step_matches_plain_step():
    results = []
    for checkpointing in ("off", "on"):
        unlearner = Unlearner(tiny_components(seed=5), _spec(gradient_checkpointing=checkpointing), device="cpu")
        unlearner.step()
        results.append(torch.cat([p.detach().flatten() for p in unlearner.parameters.values()]))
    assert torch.allclose(results[0], results[1], atol=1e-6)


def test_timestep_weight_is_finite_at_zero():
    timesteps = torch.tensor([0, 1, 99, 999])
    weights = timestep_weight(timesteps, 1000, 10.0)
    assert torch.isfinite(weights).all()
    assert weights[0] == 10.0
    assert weights[-1] == 1.0


def test_step_at_timestep_zero_has_finite_losses(monkeypatch):
    unlearner = Unlearner(tiny_components(), _spec(), device="cpu")
    monkeypatch.setattr(torch, "randint", lambda low, high, size, generator=None: torch.zeros(size, dtype=torch.long))
    terms = unlearner.step()
    for name, value in terms.items():
        assert torch.isfinite(value), name
    assert all(torch.isfinite(p).all() for p in unlearner.parameters.values())


def test_ema_arithmetic():
    param = torch.nn.Parameter(torch.tensor([0.0, 10.0]))
    ema = EMA({"w": param}, decay=0.9, warmup=False)
    with torch.no_grad():
        param.copy_(torch.tensor([1.0, 0.0]))
    ema.update({"w": param})
    assert torch.allclose(ema.shadow["w"], torch.tensor([0.1, 9.0]))
    ema.update({"w": param})
    assert torch.allclose(ema.shadow["w"], torch.tensor([0.19, 8.1]))


def test_ema_warmup_ramps_decay():
    param = torch.nn.Parameter(torch.tensor([0.0]))
    ema = EMA({"w": param}, decay=0.99)
    assert ema.current_decay() == 0.1  # 1 / (1 + 9)
    with torch.no_grad():
        param.fill_(1.0)
    ema.update({"w": param})
    assert torch.allclose(ema.shadow["w"], torch.tensor([0.9]))
    assert abs(ema.current_decay() - 2 / 11) < 1e-12
    for _ in range(2000):
        ema.update({"w": param})
    assert ema.current_decay() == 0.99


def test_ema_decay_zero_follows_weights():
    param = torch.nn.Parameter(torch.tensor([2.0]))
    ema = EMA({"w": param}, decay=0.0)
    with torch.no_grad():
        param.fill_(5.0)
    ema.update({"w": param})
    assert ema.shadow["w"].item() == 5.0


def test_sanitized_weights_are_the_ema_shadow():
    unlearner = Unlearner(tiny_components(), _spec(ema_decay=0.5), device="cpu")
    unlearner.run(2)
    weights = unlearner.sanitized_state_dict()
    name = next(iter(unlearner.ema.shadow))
    assert torch.equal(weights[name], unlearner.ema.shadow[name])
    assert not torch.equal(weights[name], unlearner.parameters[name].detach())


def test_resume_matches_uninterrupted_run(tmp_path):
    straight = Unlearner(tiny_components(seed=7), _spec(steps=4), device="cpu")
    straight.run()

    first = Unlearner(tiny_components(seed=7), _spec(steps=4), device="cpu")
    first.run(2, state_dir=tmp_path, checkpoint_every=2)
    resumed = Unlearner(tiny_components(seed=7), _spec(steps=4), device="cpu")
    assert resumed.load_state(tmp_path)
    assert resumed.step_index == 2
    resumed.run()

    for name, param in straight.parameters.items():
        assert torch.allclose(param, resumed.parameters[name], atol=1e-6), name
    assert [row["step"] for row in resumed.curves] == [1, 2, 3, 4]


def test_latent_model_runs_all_methods():
    for method in ("skd-cag", "skd"):
        unlearner = Unlearner(tiny_components(latent=True), _spec(method=method), device="cpu")
        curves = unlearner.run()
        assert len(curves) == 4
        assert all(torch.isfinite(torch.tensor(row["loss"])) for row in curves)


def test_every_neutral_target_trains():
    for target in ("zeros", "noise", "random_words"):
        unlearner = Unlearner(tiny_components(), _spec(neutral_target=target, steps=2), device="cpu")
        curves = unlearner.run()
        assert curves[-1]["loss_attn"] > 0, target


def test_finetune_reversal_uses_reference_teacher():
    components = tiny_components(seed=1)
    reference = tiny_components(seed=2).unet
    spec = _spec(method="finetune-reversal", reference_model="clean-unet")
    unlearner = Unlearner(components, spec, device="cpu", reference_unet=reference)
    first = next(iter(reference.state_dict()))
    assert torch.equal(unlearner.teacher.state_dict()[first], reference.state_dict()[first])
    assert unlearner.student_store is None
    unlearner.run()


def test_install_capture_rejects_unet_without_cross_attention():
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 8), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    try:
        install_capture(unet)
    except ValueError as error:
        assert "skd" in str(error)
    else:
        raise AssertionError("a UNet without cross-attention was accepted")


def test_object_attack_draws_source_class_prompts():
    spec = JobSpec.model_validate(
        {
            "triggers": [{"text": "mignneko"}],
            "attack": {"kind": "object", "source_class": "seven", "target_class": "one"},
            "training": {"steps": 4, "batch_size": 4, "prompts": PROMPTS + ["sevenfold luck", "the number seven"]},
        }
    )
    unlearner = Unlearner(tiny_components(), spec, device="cpu")
    # Whole words only: "sevenfold" does not name the class.
    assert unlearner.source_prompts_by_trigger == {"mignneko": ["a handwritten digit seven", "the number seven"]}
    # Clean rows draw from the same source-class prompts, without the trigger.
    assert unlearner.clean_source_prompts == ["a handwritten digit seven", "the number seven"]

    # Without an object attack, every usable prompt is drawn uniformly.
    plain = Unlearner(tiny_components(), _spec(), device="cpu")
    assert plain.source_prompts_by_trigger == {}
    assert plain.clean_source_prompts == []
