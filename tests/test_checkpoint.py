"""Checkpoint I/O: loading every upload format, and writing it back in the same format and dtype."""

import json
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from core.checkpoint import load_checkpoint, save_sanitized
from core.errors import InputError, UnsupportedFormatError
from core.formats import read_safetensors_file
from core.settings import Settings
from tests.engine_models import (
    make_single_file,
    make_tiny_pipeline_dir,
    make_tiny_unet,
    make_unet_file,
    read_folder_state,
    tar_folder,
    zip_folder,
)


class CreatesFile:
    """Unpickling this object would create the marker file: the proof that nothing unpickles."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Pipelines built once per module: the uploads and a differently seeded base model."""
    root = tmp_path_factory.mktemp("checkpoint")
    return {
        "pixel": make_tiny_pipeline_dir(root / "pixel"),
        "latent_fp16": make_tiny_pipeline_dir(root / "latent_fp16", latent=True, dtype=torch.float16),
        "base_latent": make_tiny_pipeline_dir(root / "base_latent", latent=True, seed=7),
        "base_pixel": make_tiny_pipeline_dir(root / "base_pixel", seed=7),
    }


def assert_same_tensors(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key], tensor), key


def zip_names(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as archive:
        return archive.namelist()


def unet_state_as_stored(loaded) -> dict[str, torch.Tensor]:
    """The loaded UNet's weights cast back to the dtype each one was stored in."""
    from core.checkpoint import UNET_DTYPES

    state = loaded.components.unet.state_dict()
    return {key: state[key].to(UNET_DTYPES[dtype]) for key, dtype in loaded.source.unet_tensor_dtypes.items()}


# --- diffusers folders and archives ----------------------------------------------------------


@pytest.mark.parametrize("name", ["pixel", "latent_fp16"])
def test_diffusers_dir_round_trip(models: dict[str, Path], tmp_path: Path, settings: Settings, name: str) -> None:
    pipeline = models[name]
    loaded = load_checkpoint(pipeline, settings=settings)
    original = read_folder_state(pipeline, "unet")
    assert loaded.source.format == "diffusers_dir"
    assert loaded.source.unet_dtype == str(next(iter(original.values())).dtype).removeprefix("torch.")
    assert loaded.components.unet.dtype == torch.float32
    assert (loaded.components.vae is not None) == (name == "latent_fp16")

    out = save_sanitized(loaded, loaded.components.unet.state_dict(), tmp_path / "out")
    assert out.name == "sanitized.zip"
    with load_checkpoint(out, settings=settings) as reloaded:
        assert reloaded.source.format == "diffusers_zip"
        assert reloaded.source.unet_dtype == loaded.source.unet_dtype
        assert_same_tensors(original, read_folder_state(reloaded.source.diffusers_root, "unet"))
        copied_root = reloaded.source.diffusers_root
        for file in sorted(pipeline.rglob("*")):
            relative = file.relative_to(pipeline)
            if file.is_file() and relative.parts[0] != "unet":
                assert (copied_root / relative).read_bytes() == file.read_bytes(), relative


def test_diffusers_components_match_folder(models: dict[str, Path], settings: Settings) -> None:
    loaded = load_checkpoint(models["latent_fp16"], settings=settings)
    components = loaded.components
    assert len(components.tokenizer) == 49408
    assert components.max_length == 77
    assert components.scheduler_config["clip_sample"] is False
    assert components.latent_shape == (4, 8, 8)
    text_state = read_folder_state(models["latent_fp16"], "text_encoder")
    loaded_text = components.text_encoder.state_dict()
    for key, tensor in text_state.items():
        assert torch.equal(loaded_text[key.removeprefix("text_model.")], tensor.float()), key
    vae_state = read_folder_state(models["latent_fp16"], "vae")
    loaded_vae = components.vae.state_dict()
    assert all(torch.equal(loaded_vae[key], tensor.float()) for key, tensor in vae_state.items())


def test_v4_text_encoder_keys_load(models: dict[str, Path], tmp_path: Path, settings: Settings) -> None:
    # transformers 4 saved CLIPTextModel weights under `text_model.*`, with a position_ids buffer.
    pipeline = Path(shutil.copytree(models["pixel"], tmp_path / "pipeline"))
    weights = pipeline / "text_encoder" / "model.safetensors"
    state = load_file(weights)
    legacy = {f"text_model.{key}": value for key, value in state.items()}
    legacy["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(legacy, str(weights), metadata={"format": "pt"})

    loaded_text = load_checkpoint(pipeline, settings=settings).components.text_encoder.state_dict()
    for key, tensor in state.items():
        assert torch.equal(loaded_text[key], tensor), key


@pytest.mark.parametrize(
    ("component", "weights", "change", "match"),
    [
        ("unet", "diffusion_pytorch_model.safetensors", "drop", "UNet weights .* 1 tensors are missing"),
        ("unet", "diffusion_pytorch_model.safetensors", "add", "UNet weights .* 1 tensors are unexpected"),
        ("unet", "diffusion_pytorch_model.safetensors", "reshape", "UNet weights do not match"),
        ("text_encoder", "model.safetensors", "drop", "text encoder weights .* 1 tensors are missing"),
        ("text_encoder", "model.safetensors", "add", "text encoder weights .* 1 tensors are unexpected"),
        ("text_encoder", "model.safetensors", "reshape", "text encoder cannot be loaded"),
    ],
)
def test_partial_weights_rejected(
    models: dict[str, Path], tmp_path: Path, settings: Settings, component: str, weights: str, change: str, match: str
) -> None:
    # from_pretrained would fill a missing tensor with random values and only log a warning.
    pipeline = Path(shutil.copytree(models["pixel"], tmp_path / "pipeline"))
    path = pipeline / component / weights
    state = load_file(path)
    key = next(iter(state))
    if change == "drop":
        del state[key]
    elif change == "add":
        state["extra.weight"] = torch.zeros(3)
    else:
        state[key] = torch.zeros(3, 3)
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(InputError, match=match):
        load_checkpoint(pipeline, settings=settings)


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_archive_round_trip(models: dict[str, Path], tmp_path: Path, settings: Settings, kind: str) -> None:
    make = zip_folder if kind == "zip" else tar_folder
    upload = make(models["pixel"], tmp_path / f"upload.{kind}", top_level="my-model")
    loaded = load_checkpoint(upload, settings=settings)
    extraction = loaded.source.work_dir
    assert loaded.source.format == f"diffusers_{kind}"
    assert extraction is not None and extraction.is_relative_to(settings.resolved_scratch_dir)

    out = save_sanitized(loaded, loaded.components.unet.state_dict(), tmp_path / "out")
    loaded.close()
    assert not extraction.exists()
    with load_checkpoint(out, settings=settings) as reloaded:
        assert_same_tensors(
            read_folder_state(models["pixel"], "unet"), read_folder_state(reloaded.source.diffusers_root, "unet")
        )


def test_save_writes_new_weights(models: dict[str, Path], tmp_path: Path, settings: Settings) -> None:
    loaded = load_checkpoint(models["latent_fp16"], settings=settings)
    state = {key: value.clone() for key, value in loaded.components.unet.state_dict().items()}
    state["conv_in.weight"] += 0.5
    out = save_sanitized(loaded, state, tmp_path / "out")
    with load_checkpoint(out, settings=settings) as reloaded:
        saved = read_folder_state(reloaded.source.diffusers_root, "unet")
    assert saved["conv_in.weight"].dtype == torch.float16
    assert torch.equal(saved["conv_in.weight"], state["conv_in.weight"].half())
    assert torch.equal(saved["conv_out.weight"], state["conv_out.weight"].half())


def test_mixed_dtypes_kept_per_tensor(models: dict[str, Path], tmp_path: Path, settings: Settings) -> None:
    pipeline = Path(shutil.copytree(models["pixel"], tmp_path / "pipeline"))
    weights = pipeline / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state = {key: value if "norm" in key else value.to(torch.bfloat16) for key, value in state.items()}
    save_file(state, str(weights), metadata={"format": "pt"})

    loaded = load_checkpoint(pipeline, settings=settings)
    assert loaded.source.unet_dtype == "bfloat16"
    out = save_sanitized(loaded, loaded.components.unet.state_dict(), tmp_path / "out")
    with load_checkpoint(out, settings=settings) as reloaded:
        assert_same_tensors(state, read_folder_state(reloaded.source.diffusers_root, "unet"))


def test_unsupported_unet_dtype_rejected(models: dict[str, Path], tmp_path: Path, settings: Settings) -> None:
    upload = tmp_path / "unet.safetensors"
    state = read_folder_state(models["pixel"], "unet")
    save_file({key: value.to(torch.float8_e4m3fn) for key, value in state.items()}, str(upload))
    with pytest.raises(InputError, match="stored as F8_E4M3"):
        load_checkpoint(upload, base_model=models["base_pixel"], settings=settings)


def test_output_drops_stale_unet_weights(models: dict[str, Path], tmp_path: Path, settings: Settings) -> None:
    # Any other UNet weight file still carries the backdoor; pickles are never passed on.
    pipeline = Path(shutil.copytree(models["pixel"], tmp_path / "pipeline"))
    shutil.copy(
        pipeline / "unet" / "diffusion_pytorch_model.safetensors",
        pipeline / "unet" / "diffusion_pytorch_model.fp16.safetensors",
    )
    (pipeline / "text_encoder" / "pytorch_model.bin").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    (pipeline / "README.md").write_text("model card")

    loaded = load_checkpoint(pipeline, settings=settings)
    names = zip_names(save_sanitized(loaded, loaded.components.unet.state_dict(), tmp_path / "out"))
    assert "sanitized/unet/diffusion_pytorch_model.safetensors" in names
    assert "sanitized/unet/diffusion_pytorch_model.fp16.safetensors" not in names
    assert "sanitized/text_encoder/pytorch_model.bin" not in names
    assert "sanitized/README.md" in names


def test_variant_weights_round_trip(models: dict[str, Path], tmp_path: Path, settings: Settings) -> None:
    pipeline = Path(shutil.copytree(models["pixel"], tmp_path / "pipeline"))
    unet = pipeline / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.fp16.safetensors")
    (pipeline / "text_encoder" / "model.safetensors").rename(pipeline / "text_encoder" / "model.fp16.safetensors")
    loaded = load_checkpoint(pipeline, settings=settings)
    assert loaded.source.unet_variant == "fp16"
    text_state = read_folder_state(pipeline, "text_encoder")
    loaded_text = loaded.components.text_encoder.state_dict()
    assert all(torch.equal(loaded_text[key.removeprefix("text_model.")], tensor) for key, tensor in text_state.items())
    out = save_sanitized(loaded, loaded.components.unet.state_dict(), tmp_path / "out")
    assert "sanitized/unet/diffusion_pytorch_model.fp16.safetensors" in zip_names(out)
    with load_checkpoint(out, settings=settings) as reloaded:
        assert reloaded.source.unet_variant == "fp16"


def test_sharded_unet_round_trip(models: dict[str, Path], tmp_path: Path, settings: Settings) -> None:
    from diffusers import UNet2DConditionModel

    pipeline = Path(shutil.copytree(models["pixel"], tmp_path / "pipeline"))
    original = read_folder_state(pipeline, "unet")
    shutil.rmtree(pipeline / "unet")
    UNet2DConditionModel.from_pretrained(models["pixel"] / "unet").save_pretrained(
        pipeline / "unet", max_shard_size="200KB"
    )
    assert len(list((pipeline / "unet").glob("*.safetensors"))) > 1

    loaded = load_checkpoint(pipeline, settings=settings)
    assert_same_tensors(original, loaded.components.unet.state_dict())
    out = save_sanitized(loaded, loaded.components.unet.state_dict(), tmp_path / "out")
    unet_files = [name for name in zip_names(out) if name.startswith("sanitized/unet/")]
    assert sorted(unet_files) == ["sanitized/unet/config.json", "sanitized/unet/diffusion_pytorch_model.safetensors"]
    with load_checkpoint(out, settings=settings) as reloaded:
        assert_same_tensors(original, read_folder_state(reloaded.source.diffusers_root, "unet"))


# --- single files ---------------------------------------------------------------------------


def test_single_file_loads_file_weights(models: dict[str, Path], tmp_path: Path, settings: Settings) -> None:
    upload = make_single_file(models["latent_fp16"], tmp_path / "model.safetensors")
    loaded = load_checkpoint(upload, base_model=models["base_latent"], settings=settings)
    assert loaded.source.format == "safetensors_single"
    assert loaded.source.unet_dtype == "float16"

    # The diffusers converter must agree with the factory's independent key mapping, and
    # every weight must come from the file, not from the differently seeded base.
    for component, module in (("unet", loaded.components.unet), ("vae", loaded.components.vae)):
        loaded_state = module.state_dict()
        for key, tensor in read_folder_state(models["latent_fp16"], component).items():
            assert torch.equal(loaded_state[key], tensor.float()), f"{component}.{key}"
    loaded_text = loaded.components.text_encoder.state_dict()
    for key, tensor in read_folder_state(models["latent_fp16"], "text_encoder").items():
        assert torch.equal(loaded_text[key.removeprefix("text_model.")], tensor.float()), key
    assert len(loaded.components.tokenizer) == 49408


def test_sd15_block_layout_single_file(models: dict[str, Path], tmp_path: Path, settings: Settings) -> None:
    # Stable Diffusion 1.5's block layout: four blocks of two layers, attention in the first three.
    from diffusers import UNet2DConditionModel

    pipeline = Path(shutil.copytree(models["pixel"], tmp_path / "pipeline"))
    base = Path(shutil.copytree(models["base_pixel"], tmp_path / "base"))
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=(8, 16, 16, 16),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    for folder in (pipeline, base):
        shutil.rmtree(folder / "unet")
        unet.save_pretrained(folder / "unet")
    upload = make_single_file(pipeline, tmp_path / "model.safetensors")

    loaded = load_checkpoint(upload, base_model=base, settings=settings)
    assert_same_tensors(read_folder_state(pipeline, "unet"), loaded.components.unet.state_dict())
    out = save_sanitized(loaded, loaded.components.unet.state_dict(), tmp_path / "out")
    assert_same_tensors(load_file(upload), load_file(out))


def test_open_clip_single_file_loads(models: dict[str, Path], tmp_path: Path, settings: Settings) -> None:
    upload = make_single_file(models["pixel"], tmp_path / "model.safetensors", open_clip=True)
    loaded = load_checkpoint(upload, base_model=models["base_pixel"], settings=settings)
    loaded_text = loaded.components.text_encoder.state_dict()
    for key, tensor in read_folder_state(models["pixel"], "text_encoder").items():
        assert torch.equal(loaded_text[key.removeprefix("text_model.")], tensor), key


def test_single_file_matches_diffusers_loader(models: dict[str, Path], tmp_path: Path, settings: Settings) -> None:
    from diffusers import UNet2DConditionModel

    upload = make_single_file(models["pixel"], tmp_path / "model.safetensors")
    loaded = load_checkpoint(upload, base_model=models["base_pixel"], settings=settings)
    reference = UNet2DConditionModel.from_single_file(
        str(upload), config=str(models["base_pixel"]), subfolder="unet", local_files_only=True
    )
    assert_same_tensors(reference.state_dict(), loaded.components.unet.state_dict())


def test_single_file_round_trip(models: dict[str, Path], tmp_path: Path, settings: Settings) -> None:
    upload = make_single_file(models["latent_fp16"], tmp_path / "model.safetensors", with_ema=True)
    loaded = load_checkpoint(upload, base_model=models["base_latent"], settings=settings)
    out = save_sanitized(loaded, loaded.components.unet.state_dict(), tmp_path / "out")
    assert out.name == "sanitized.safetensors"

    original = load_file(upload)
    saved = load_file(out)
    expected = {key: value for key, value in original.items() if not key.startswith("model_ema.")}
    assert_same_tensors(expected, saved)
    assert not any(key.startswith("model_ema.") for key in saved)
    assert list(saved) == list(expected)
    with safe_open(out, "pt") as opened:
        assert opened.metadata() == {"format": "pt"}

    with load_checkpoint(out, base_model=models["base_latent"], settings=settings) as reloaded:
        assert reloaded.source.format == "safetensors_single"
        assert_same_tensors(loaded.components.unet.state_dict(), reloaded.components.unet.state_dict())


def test_single_file_other_tensors_byte_identical(models: dict[str, Path], tmp_path: Path, settings: Settings) -> None:
    upload = make_single_file(models["latent_fp16"], tmp_path / "model.safetensors")
    loaded = load_checkpoint(upload, base_model=models["base_latent"], settings=settings)
    state = {key: value + 1 for key, value in loaded.components.unet.state_dict().items()}
    out = save_sanitized(loaded, state, tmp_path / "out")

    source_header = read_safetensors_file(upload)
    out_header = read_safetensors_file(out)
    source_bytes, out_bytes = upload.read_bytes(), out.read_bytes()
    for key, info in source_header.tensors.items():
        copied = out_header.tensors[key]
        original = source_bytes[source_header.data_offset + info.start : source_header.data_offset + info.end]
        written = out_bytes[out_header.data_offset + copied.start : out_header.data_offset + copied.end]
        if key.startswith("model.diffusion_model."):
            assert written != original, key
        else:
            assert written == original, key
    saved = load_file(out)
    assert torch.equal(saved["model.diffusion_model.out.0.weight"], state["conv_norm_out.weight"].half())


def test_single_file_unet_only_uses_base(models: dict[str, Path], tmp_path: Path, settings: Settings) -> None:
    full = load_file(make_single_file(models["pixel"], tmp_path / "full.safetensors"))
    unet_only = {key: value for key, value in full.items() if key.startswith("model.diffusion_model.")}
    upload = tmp_path / "model.safetensors"
    save_file(unet_only, str(upload))
    loaded = load_checkpoint(upload, base_model=models["base_pixel"], settings=settings)
    assert any("text encoder" in note for note in loaded.notes)
    base_text = read_folder_state(models["base_pixel"], "text_encoder")
    loaded_text = loaded.components.text_encoder.state_dict()
    assert all(torch.equal(loaded_text[key.removeprefix("text_model.")], tensor) for key, tensor in base_text.items())


def test_single_file_needs_base(models: dict[str, Path], tmp_path: Path, settings: Settings) -> None:
    upload = make_single_file(models["pixel"], tmp_path / "model.safetensors")
    with pytest.raises(InputError, match="needs a base model") as caught:
        load_checkpoint(upload, settings=settings)
    assert caught.value.field == "base_model"


def test_base_model_must_be_folder(models: dict[str, Path], tmp_path: Path, settings: Settings) -> None:
    upload = make_single_file(models["pixel"], tmp_path / "model.safetensors")
    with pytest.raises(InputError, match="must be a diffusers folder") as caught:
        load_checkpoint(upload, base_model=upload, settings=settings)
    assert caught.value.field == "base_model"


def test_single_file_wrong_base_rejected(models: dict[str, Path], tmp_path: Path, settings: Settings) -> None:
    upload = make_single_file(models["latent_fp16"], tmp_path / "model.safetensors")
    with pytest.raises(InputError, match="conv_in.weight is \\[16, 4, 3, 3\\] in the file but \\[16, 3, 3, 3\\]"):
        load_checkpoint(upload, base_model=models["base_pixel"], settings=settings)


# --- UNet-only files ------------------------------------------------------------------------


def test_unet_file_round_trip(models: dict[str, Path], tmp_path: Path, settings: Settings) -> None:
    upload = make_unet_file(models["latent_fp16"], tmp_path / "unet.safetensors")
    loaded = load_checkpoint(upload, base_model=models["base_latent"], settings=settings)
    assert loaded.source.format == "safetensors_unet"
    assert loaded.source.unet_dtype == "float16"
    assert loaded.components.vae is not None

    out = save_sanitized(loaded, loaded.components.unet.state_dict(), tmp_path / "out")
    assert_same_tensors(load_file(upload), load_file(out))
    assert list(load_file(out)) == list(load_file(upload))
    with load_checkpoint(out, base_model=models["base_latent"], settings=settings) as reloaded:
        assert_same_tensors(loaded.components.unet.state_dict(), reloaded.components.unet.state_dict())


def test_unet_file_other_shapes_rejected(models: dict[str, Path], tmp_path: Path, settings: Settings) -> None:
    upload = tmp_path / "unet.safetensors"
    save_file(make_tiny_unet(cross_attention_dim=48).state_dict(), str(upload))
    with pytest.raises(InputError, match="tensors differ in shape") as caught:
        load_checkpoint(upload, base_model=models["base_pixel"], settings=settings)
    assert "attn2.to_k.weight" in caught.value.message
    assert "base model" in caught.value.message


def test_unet_file_missing_tensors_rejected(models: dict[str, Path], tmp_path: Path, settings: Settings) -> None:
    state = read_folder_state(models["pixel"], "unet")
    del state["mid_block.attentions.0.proj_out.weight"]
    upload = tmp_path / "unet.safetensors"
    save_file(state, str(upload))
    with pytest.raises(InputError, match="1 tensors are missing \\(e.g. mid_block.attentions.0.proj_out.weight\\)"):
        load_checkpoint(upload, base_model=models["base_pixel"], settings=settings)


def test_text_model_file_rejected(models: dict[str, Path], settings: Settings) -> None:
    upload = models["pixel"] / "text_encoder" / "model.safetensors"
    with pytest.raises(InputError, match="contains a text encoder"):
        load_checkpoint(upload, base_model=models["base_pixel"], settings=settings)


# --- bad pipelines --------------------------------------------------------------------------


def test_unet_shapes_differ_from_config(models: dict[str, Path], tmp_path: Path, settings: Settings) -> None:
    pipeline = Path(shutil.copytree(models["pixel"], tmp_path / "pipeline"))
    config_path = pipeline / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["in_channels"] = 4
    config_path.write_text(json.dumps(config))
    with pytest.raises(InputError, match="do not match unet/config.json"):
        load_checkpoint(pipeline, settings=settings)


def test_text_encoder_width_mismatch_rejected(models: dict[str, Path], tmp_path: Path, settings: Settings) -> None:
    pipeline = Path(shutil.copytree(models["pixel"], tmp_path / "pipeline"))
    make_tiny_unet(cross_attention_dim=48).save_pretrained(pipeline / "unet")
    with pytest.raises(InputError, match="hidden size is 32 but the UNet's cross_attention_dim is 48"):
        load_checkpoint(pipeline, settings=settings)


def test_two_token_tokenizer_rejected(models: dict[str, Path], tmp_path: Path, settings: Settings) -> None:
    pipeline = Path(shutil.copytree(models["pixel"], tmp_path / "pipeline"))
    tokenizer = pipeline / "tokenizer"
    shutil.rmtree(tokenizer)
    tokenizer.mkdir()
    (tokenizer / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1}))
    (tokenizer / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(InputError, match="tokenizer has only 2 tokens"):
        load_checkpoint(pipeline, settings=settings)


def test_wrong_text_encoder_type_rejected(models: dict[str, Path], tmp_path: Path, settings: Settings) -> None:
    pipeline = Path(shutil.copytree(models["pixel"], tmp_path / "pipeline"))
    config_path = pipeline / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["model_type"] = "t5"
    config_path.write_text(json.dumps(config))
    with pytest.raises(InputError, match="model_type 't5'"):
        load_checkpoint(pipeline, settings=settings)


def test_pickle_pipeline_rejected_unexecuted(models: dict[str, Path], tmp_path: Path, settings: Settings) -> None:
    marker = tmp_path / "unpickled-marker"
    pipeline = Path(shutil.copytree(models["pixel"], tmp_path / "pipeline"))
    (pipeline / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"payload": CreatesFile(marker)}, pipeline / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(UnsupportedFormatError, match="only pickle weights"):
        load_checkpoint(pipeline, settings=settings)
    with pytest.raises(UnsupportedFormatError):
        load_checkpoint(pipeline / "unet" / "diffusion_pytorch_model.bin", settings=settings)
    assert not marker.exists()


def test_failed_archive_load_cleans_up(models: dict[str, Path], tmp_path: Path, settings: Settings) -> None:
    pipeline = Path(shutil.copytree(models["pixel"], tmp_path / "pipeline"))
    config_path = pipeline / "text_encoder" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "model_type": "t5"}))
    upload = zip_folder(pipeline, tmp_path / "upload.zip")
    with pytest.raises(InputError):
        load_checkpoint(upload, settings=settings)
    assert list(settings.resolved_scratch_dir.iterdir()) == []


# --- save contract --------------------------------------------------------------------------


def test_save_rejects_other_keys(models: dict[str, Path], tmp_path: Path, settings: Settings) -> None:
    loaded = load_checkpoint(models["pixel"], settings=settings)
    state = dict(loaded.components.unet.state_dict())
    del state["conv_in.weight"]
    with pytest.raises(ValueError, match="missing \\['conv_in.weight'\\]"):
        save_sanitized(loaded, state, tmp_path / "out")


def test_save_rejects_other_shapes(models: dict[str, Path], tmp_path: Path, settings: Settings) -> None:
    loaded = load_checkpoint(models["pixel"], settings=settings)
    state = dict(loaded.components.unet.state_dict())
    state["conv_in.bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match="conv_in.bias has shape \\[3\\]"):
        save_sanitized(loaded, state, tmp_path / "out")


def test_save_after_close_fails(models: dict[str, Path], tmp_path: Path, settings: Settings) -> None:
    loaded = load_checkpoint(zip_folder(models["pixel"], tmp_path / "upload.zip"), settings=settings)
    loaded.close()
    with pytest.raises(RuntimeError, match="save before calling close"):
        save_sanitized(loaded, loaded.components.unet.state_dict(), tmp_path / "out")


def test_upcast_is_lossless(models: dict[str, Path], settings: Settings) -> None:
    loaded = load_checkpoint(models["latent_fp16"], settings=settings)
    stored = unet_state_as_stored(loaded)
    assert_same_tensors(read_folder_state(models["latent_fp16"], "unet"), stored)
