"""Upload checks: format detection, safetensors headers, pickles, archives and diffusers folders."""

import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from core.errors import InputError, UnsupportedFormatError
from core.formats import inspect_upload, looks_like_pickle, safe_extract
from core.settings import Settings
from tests.engine_models import make_single_file, make_tiny_pipeline_dir, make_unet_file, tar_folder, zip_folder

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_pipeline_dir(tmp_path_factory.mktemp("formats") / "pipeline", latent=True)


@pytest.fixture
def pipeline_copy(pipeline_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pipeline_dir, tmp_path / "pipeline"))


def safetensors_bytes(header: dict, data: bytes, *, header_size: int | None = None) -> bytes:
    """Serialize a hand-made safetensors header and data section, valid or not."""
    encoded = json.dumps(header).encode()
    size = len(encoded) if header_size is None else header_size
    return struct.pack("<Q", size) + encoded + data


def unet_header(**entries: dict) -> dict:
    """A header with UNet key names, so that a valid file classifies as `safetensors_unet`."""
    header = {
        "conv_in.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "time_embedding.linear_1.weight": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
        "down_blocks.0.resnets.0.conv1.weight": {"dtype": "F16", "shape": [2], "data_offsets": [12, 16]},
        "conv_out.weight": {"dtype": "F32", "shape": [1], "data_offsets": [16, 20]},
    }
    header.update(entries)
    return header


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


class CreatesFile:
    """Unpickling this object would create the marker file: the proof that nothing unpickles."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# --- safetensors files ------------------------------------------------------------------


def test_handmade_unet_file_accepted(tmp_path: Path, settings: Settings) -> None:
    path = write(tmp_path / "unet.safetensors", safetensors_bytes(unet_header(), bytes(20)))
    info = inspect_upload(path, settings=settings)
    assert info.format == "safetensors_unet"
    assert info.tensor_count == 4
    assert info.dtypes == ["F16", "F32"]
    assert info.tensor_bytes == 20
    assert info.components == ["unet"]


def test_unet_file_from_model(pipeline_dir: Path, tmp_path: Path, settings: Settings) -> None:
    info = inspect_upload(make_unet_file(pipeline_dir, tmp_path / "unet.safetensors"), settings=settings)
    assert info.format == "safetensors_unet"
    assert info.unet_dtypes == ["F32"]
    assert info.tensor_count > 100


def test_single_file_detected(pipeline_dir: Path, tmp_path: Path, settings: Settings) -> None:
    path = make_single_file(pipeline_dir, tmp_path / "model.safetensors", with_ema=True)
    info = inspect_upload(path, settings=settings)
    assert info.format == "safetensors_single"
    assert info.components == ["unet", "vae", "text_encoder"]
    assert any("EMA" in warning for warning in info.warnings)


def test_safetensors_renamed_ckpt_accepted(tmp_path: Path, settings: Settings) -> None:
    # Content decides: parsing safetensors runs no code, whatever the file is called.
    path = write(tmp_path / "model.ckpt", safetensors_bytes(unet_header(), bytes(20)))
    info = inspect_upload(path, settings=settings)
    assert info.format == "safetensors_unet"
    assert any("pickle file extension" in warning for warning in info.warnings)


def test_upload_filename_used_in_messages(tmp_path: Path, settings: Settings) -> None:
    path = write(tmp_path / "upload-3f2a", b"")
    with pytest.raises(InputError, match="my-model.safetensors is empty"):
        inspect_upload(path, filename="my-model.safetensors", settings=settings)


@pytest.mark.parametrize(
    ("header", "data", "header_size", "match"),
    [
        (unet_header(), bytes(19), None, "past its end"),
        (unet_header(), bytes(24), None, "follow the last tensor"),
        ({}, b"", 2**60, "above the limit"),
        ({}, b"", 10**6, "truncated"),
        (
            unet_header(**{"conv_out.weight": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}}),
            bytes(20),
            None,
            "overlaps",
        ),
        (
            unet_header(**{"conv_in.weight": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}),
            bytes(20),
            None,
            "needs 12 bytes",
        ),
        (
            unet_header(**{"conv_in.weight": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}),
            bytes(20),
            None,
            "overlaps|unused bytes",
        ),
        (
            unet_header(**{"conv_in.weight": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}),
            bytes(20),
            None,
            "unknown dtype",
        ),
        (
            unet_header(**{"conv_in.weight": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}),
            bytes(20),
            None,
            "invalid shape",
        ),
        (
            unet_header(**{"conv_in.weight": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}),
            bytes(20),
            None,
            "invalid data_offsets",
        ),
        (unet_header(__metadata__={"format": 1}), bytes(20), None, "__metadata__"),
        ([1, 2], b"", None, "not a JSON object"),
    ],
)
def test_bad_safetensors_rejected(
    tmp_path: Path, settings: Settings, header, data: bytes, header_size, match: str
) -> None:
    path = write(tmp_path / "unet.safetensors", safetensors_bytes(header, data, header_size=header_size))
    with pytest.raises(InputError, match=match) as caught:
        inspect_upload(path, settings=settings)
    assert caught.value.field == "checkpoint"


def test_gap_between_tensors_rejected(tmp_path: Path, settings: Settings) -> None:
    header = unet_header(**{"conv_out.weight": {"dtype": "F32", "shape": [1], "data_offsets": [20, 24]}})
    path = write(tmp_path / "unet.safetensors", safetensors_bytes(header, bytes(24)))
    with pytest.raises(InputError, match="4 unused bytes before tensor 'conv_out.weight'"):
        inspect_upload(path, settings=settings)


def test_header_not_json_rejected(tmp_path: Path, settings: Settings) -> None:
    raw = b"{not json at all}"
    path = write(tmp_path / "unet.safetensors", struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(InputError, match="not valid JSON"):
        inspect_upload(path, settings=settings)


def test_duplicate_tensor_name_rejected(tmp_path: Path, settings: Settings) -> None:
    raw = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    path = write(tmp_path / "unet.safetensors", struct.pack("<Q", len(raw)) + raw + b"\x00")
    with pytest.raises(InputError, match="duplicate key 'a'"):
        inspect_upload(path, settings=settings)


def test_header_over_setting_rejected(tmp_path: Path) -> None:
    path = write(tmp_path / "unet.safetensors", safetensors_bytes(unet_header(), bytes(20)))
    with pytest.raises(InputError, match="SEALER_MAX_SAFETENSORS_HEADER_BYTES"):
        inspect_upload(path, settings=Settings(data_dir=tmp_path, max_safetensors_header_bytes=64))


def test_truncated_model_file_rejected(pipeline_dir: Path, tmp_path: Path, settings: Settings) -> None:
    data = make_unet_file(pipeline_dir, tmp_path / "full.safetensors").read_bytes()
    path = write(tmp_path / "cut.safetensors", data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated"):
        inspect_upload(path, settings=settings)


def test_empty_file_rejected(tmp_path: Path, settings: Settings) -> None:
    with pytest.raises(InputError, match="empty"):
        inspect_upload(write(tmp_path / "model.safetensors", b""), settings=settings)


def test_tiny_file_rejected(tmp_path: Path, settings: Settings) -> None:
    with pytest.raises(InputError, match="truncated"):
        inspect_upload(write(tmp_path / "model.safetensors", b"\x10\x00"), settings=settings)


def test_upload_over_size_limit_rejected(tmp_path: Path) -> None:
    path = write(tmp_path / "unet.safetensors", safetensors_bytes(unet_header(), bytes(20)))
    with pytest.raises(InputError, match="SEALER_MAX_UPLOAD_BYTES"):
        inspect_upload(path, settings=Settings(data_dir=tmp_path, max_upload_bytes=100))


def test_text_encoder_file_rejected(pipeline_dir: Path, settings: Settings) -> None:
    with pytest.raises(InputError, match="contains a text encoder"):
        inspect_upload(pipeline_dir / "text_encoder" / "model.safetensors", settings=settings)


def test_vae_file_rejected(pipeline_dir: Path, settings: Settings) -> None:
    with pytest.raises(InputError, match="contains a VAE"):
        inspect_upload(pipeline_dir / "vae" / "diffusion_pytorch_model.safetensors", settings=settings)


def test_lora_file_rejected(tmp_path: Path, settings: Settings) -> None:
    header = {"lora_unet_down_blocks_0_attn.lora_down.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    path = write(tmp_path / "lora.safetensors", safetensors_bytes(header, bytes(4)))
    with pytest.raises(InputError, match="LoRA adapter"):
        inspect_upload(path, settings=settings)


def test_empty_safetensors_rejected(tmp_path: Path, settings: Settings) -> None:
    with pytest.raises(InputError, match="contains no tensors"):
        inspect_upload(write(tmp_path / "unet.safetensors", safetensors_bytes({}, b"")), settings=settings)


# --- pickles --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["model.ckpt", "model.pt", "model.pth", "pytorch_model.bin", "model.safetensors", "model"]
)
@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_pickle_rejected_unexecuted(tmp_path: Path, settings: Settings, name: str, protocol: int) -> None:
    marker = tmp_path / "unpickled-marker"
    path = write(tmp_path / "upload" / name, pickle.dumps({"state_dict": CreatesFile(marker)}, protocol=protocol))
    with pytest.raises(UnsupportedFormatError, match="convert it to safetensors") as caught:
        inspect_upload(path, settings=settings)
    assert not marker.exists()
    assert caught.value.field == "checkpoint"
    assert "weights_only=True" in caught.value.message


@pytest.mark.parametrize("name", ["model.pt", "model.zip", "model.safetensors"])
def test_torch_zip_rejected_unexecuted(tmp_path: Path, settings: Settings, name: str) -> None:
    torch = pytest.importorskip("torch")
    marker = tmp_path / "unpickled-marker"
    path = tmp_path / "upload" / name
    path.parent.mkdir()
    torch.save({"weight": torch.zeros(2), "payload": CreatesFile(marker)}, path)
    with pytest.raises(UnsupportedFormatError, match="pickle") as caught:
        inspect_upload(path, settings=settings)
    assert not marker.exists()
    assert "safetensors" in caught.value.message


def test_pickle_suffix_unknown_content_rejected(tmp_path: Path, settings: Settings) -> None:
    path = write(tmp_path / "model.bin", b"\x00\x01\x02 some bytes that are no known format")
    with pytest.raises(UnsupportedFormatError, match="pickle-based checkpoint"):
        inspect_upload(path, settings=settings)


def test_unknown_format_rejected(tmp_path: Path, settings: Settings) -> None:
    path = write(tmp_path / "model.onnx", b"\x08\x07\x12\x04 some protobuf-looking bytes")
    with pytest.raises(UnsupportedFormatError, match="not a format Sealer reads"):
        inspect_upload(path, settings=settings)


def test_pickle_sniffing() -> None:
    assert looks_like_pickle(pickle.dumps([1], protocol=2))
    assert looks_like_pickle(pickle.dumps({"a": 1}, protocol=5))
    assert looks_like_pickle(pickle.dumps({"a": 1}, protocol=0))
    assert not looks_like_pickle(safetensors_bytes(unet_header(), bytes(20)))


# --- diffusers folders ---------------------------------------------------------------------


def test_diffusers_dir_accepted(pipeline_dir: Path, settings: Settings) -> None:
    info = inspect_upload(pipeline_dir, settings=settings)
    assert info.format == "diffusers_dir"
    assert info.components == ["unet", "text_encoder", "tokenizer", "scheduler", "vae"]
    assert info.unet_dtypes == ["F32"]
    assert info.tensor_count > 200
    assert info.warnings == []


def test_dir_without_model_index_rejected(pipeline_copy: Path, settings: Settings) -> None:
    (pipeline_copy / "model_index.json").unlink()
    with pytest.raises(InputError, match="no model_index.json"):
        inspect_upload(pipeline_copy, settings=settings)


@pytest.mark.parametrize("component", ["unet", "text_encoder", "tokenizer", "scheduler"])
def test_dir_missing_component_rejected(pipeline_copy: Path, settings: Settings, component: str) -> None:
    shutil.rmtree(pipeline_copy / component)
    with pytest.raises(InputError, match=f"lacks the component folder\\(s\\) {component}"):
        inspect_upload(pipeline_copy, settings=settings)


def test_dir_listed_vae_missing_rejected(pipeline_copy: Path, settings: Settings) -> None:
    shutil.rmtree(pipeline_copy / "vae")
    with pytest.raises(InputError, match="lists a vae"):
        inspect_upload(pipeline_copy, settings=settings)


def test_dir_without_vae_accepted(pipeline_copy: Path, settings: Settings) -> None:
    shutil.rmtree(pipeline_copy / "vae")
    model_index = json.loads((pipeline_copy / "model_index.json").read_text())
    model_index["vae"] = [None, None]
    (pipeline_copy / "model_index.json").write_text(json.dumps(model_index))
    assert "vae" not in inspect_upload(pipeline_copy, settings=settings).components


def test_dir_symlink_rejected(pipeline_copy: Path, tmp_path: Path, settings: Settings) -> None:
    outside = write(tmp_path / "outside.txt", b"secret")
    os.symlink(outside, pipeline_copy / "tokenizer" / "merges.txt")
    with pytest.raises(InputError, match="symbolic link 'tokenizer/merges.txt'"):
        inspect_upload(pipeline_copy, settings=settings)


def test_dir_symlinked_folder_rejected(pipeline_copy: Path, settings: Settings) -> None:
    shutil.move(pipeline_copy / "scheduler", pipeline_copy.parent / "scheduler-elsewhere")
    os.symlink(pipeline_copy.parent / "scheduler-elsewhere", pipeline_copy / "scheduler")
    with pytest.raises(InputError, match="symbolic link 'scheduler'"):
        inspect_upload(pipeline_copy, settings=settings)


def test_dir_pickle_weights_rejected_unexecuted(pipeline_copy: Path, tmp_path: Path, settings: Settings) -> None:
    marker = tmp_path / "unpickled-marker"
    (pipeline_copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    write(pipeline_copy / "unet" / "diffusion_pytorch_model.bin", pickle.dumps(CreatesFile(marker), protocol=4))
    with pytest.raises(UnsupportedFormatError, match="only pickle weights"):
        inspect_upload(pipeline_copy, settings=settings)
    assert not marker.exists()


def test_dir_stray_pickle_warned(pipeline_copy: Path, settings: Settings) -> None:
    write(pipeline_copy / "text_encoder" / "pytorch_model.bin", pickle.dumps({"a": 1}))
    info = inspect_upload(pipeline_copy, settings=settings)
    assert any("text_encoder/pytorch_model.bin" in warning for warning in info.warnings)


def test_dir_pickle_named_safetensors_rejected(pipeline_copy: Path, settings: Settings) -> None:
    write(pipeline_copy / "unet" / "diffusion_pytorch_model.safetensors", pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(UnsupportedFormatError, match="is a pickle file"):
        inspect_upload(pipeline_copy, settings=settings)


def test_dir_corrupt_weights_rejected(pipeline_copy: Path, settings: Settings) -> None:
    weights = pipeline_copy / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(InputError, match="text_encoder/model.safetensors"):
        inspect_upload(pipeline_copy, settings=settings)


def test_dir_empty_tokenizer_rejected(pipeline_copy: Path, settings: Settings) -> None:
    (pipeline_copy / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(InputError, match="neither tokenizer.json nor vocab.json"):
        inspect_upload(pipeline_copy, settings=settings)


def test_dir_bad_scheduler_config_rejected(pipeline_copy: Path, settings: Settings) -> None:
    (pipeline_copy / "scheduler" / "scheduler_config.json").write_text("{broken")
    with pytest.raises(InputError, match="scheduler_config.json is not valid JSON"):
        inspect_upload(pipeline_copy, settings=settings)


def test_dir_variant_weights_accepted(pipeline_copy: Path, settings: Settings) -> None:
    unet = pipeline_copy / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.fp16.safetensors")
    assert inspect_upload(pipeline_copy, settings=settings).format == "diffusers_dir"


def test_dir_ambiguous_variants_rejected(pipeline_copy: Path, settings: Settings) -> None:
    unet = pipeline_copy / "unet"
    shutil.copy(unet / "diffusion_pytorch_model.safetensors", unet / "diffusion_pytorch_model.ema.safetensors")
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(InputError, match="several weight variants"):
        inspect_upload(pipeline_copy, settings=settings)


@pytest.mark.parametrize("variant", ["", ".fp16"])
def test_dir_sharded_weights_accepted(pipeline_copy: Path, settings: Settings, variant: str) -> None:
    unet = pipeline_copy / "unet"
    shard = f"diffusion_pytorch_model{variant}-00001-of-00001.safetensors"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / shard)
    index = {"metadata": {}, "weight_map": {"conv_in.weight": shard}}
    (unet / f"diffusion_pytorch_model{variant}.safetensors.index.json").write_text(json.dumps(index))
    assert inspect_upload(pipeline_copy, settings=settings).unet_dtypes == ["F32"]


@pytest.mark.parametrize(
    ("shard", "match"), [("missing.safetensors", "is missing"), ("../vae/config.json", "invalid shard")]
)
def test_dir_bad_shard_index_rejected(pipeline_copy: Path, settings: Settings, shard: str, match: str) -> None:
    unet = pipeline_copy / "unet"
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shard}}))
    with pytest.raises(InputError, match=match):
        inspect_upload(pipeline_copy, settings=settings)


def test_dir_too_many_files_rejected(pipeline_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="more than 5 files"):
        inspect_upload(pipeline_dir, settings=Settings(data_dir=tmp_path, max_archive_members=5))


# --- archives -------------------------------------------------------------------------------


@pytest.mark.parametrize("top_level", [None, "my-model"])
def test_zip_accepted(pipeline_dir: Path, tmp_path: Path, settings: Settings, top_level: str | None) -> None:
    info = inspect_upload(zip_folder(pipeline_dir, tmp_path / "model.zip", top_level=top_level), settings=settings)
    assert info.format == "diffusers_zip"
    assert info.root == (top_level or "")
    assert "vae" in info.components


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2"])
def test_tar_accepted(pipeline_dir: Path, tmp_path: Path, settings: Settings, mode: str) -> None:
    info = inspect_upload(
        tar_folder(pipeline_dir, tmp_path / "model.tar", top_level="model", mode=mode), settings=settings
    )
    assert info.format == "diffusers_tar"
    assert info.root == "model"


def test_zip_macos_resource_folder_ignored(pipeline_dir: Path, tmp_path: Path, settings: Settings) -> None:
    path = zip_folder(pipeline_dir, tmp_path / "model.zip", top_level="model")
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("__MACOSX/model/._model_index.json", b"\x00\x05")
    assert inspect_upload(path, settings=settings).root == "model"


def test_apple_metadata_files_skipped(pipeline_dir: Path, tmp_path: Path, settings: Settings) -> None:
    # AppleDouble files carry a tensor file's name but not its content.
    path = zip_folder(pipeline_dir, tmp_path / "model.zip", top_level="model")
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("__MACOSX/model/unet/._diffusion_pytorch_model.safetensors", b"\x00\x05\x16\x07")
        archive.writestr("model/unet/._diffusion_pytorch_model.safetensors", b"\x00\x05\x16\x07")
    assert inspect_upload(path, settings=settings).root == "model"
    root = safe_extract(path, tmp_path / "out", settings)
    assert not (root / "unet" / "._diffusion_pytorch_model.safetensors").exists()
    assert not (tmp_path / "out" / "__MACOSX").exists()


def test_zip_two_top_folders_rejected(pipeline_dir: Path, tmp_path: Path, settings: Settings) -> None:
    path = zip_folder(pipeline_dir, tmp_path / "model.zip", top_level="model")
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("other/readme.txt", b"hello")
    with pytest.raises(InputError, match="no model_index.json at its root"):
        inspect_upload(path, settings=settings)


def test_zip_missing_component_rejected(pipeline_copy: Path, tmp_path: Path, settings: Settings) -> None:
    shutil.rmtree(pipeline_copy / "scheduler")
    with pytest.raises(InputError, match="component folder\\(s\\) scheduler"):
        inspect_upload(zip_folder(pipeline_copy, tmp_path / "model.zip"), settings=settings)


def zip_with_member(pipeline_dir: Path, path: Path, name: str, data: bytes = b"x", *, mode: int | None = None) -> Path:
    zip_folder(pipeline_dir, path)
    with zipfile.ZipFile(path, "a") as archive:
        info = zipfile.ZipInfo(name)
        if mode is not None:
            info.create_system = 3
            info.external_attr = mode << 16
        archive.writestr(info, data)
    return path


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("/etc/cron.d/evil", "absolute path"),
        ("C:/Windows/evil.dll", "absolute path"),
        ("../evil.txt", "outside the archive"),
        ("unet/../../evil.txt", "outside the archive"),
        ("..\\evil.txt", "outside the archive"),
    ],
)
def test_zip_unsafe_name_rejected(
    pipeline_dir: Path, tmp_path: Path, settings: Settings, name: str, match: str
) -> None:
    path = zip_with_member(pipeline_dir, tmp_path / "model.zip", name)
    with pytest.raises(InputError, match=match):
        inspect_upload(path, settings=settings)
    with pytest.raises(InputError, match=match):
        safe_extract(path, tmp_path / "out" / "extracted", settings)
    assert not (tmp_path / "evil.txt").exists()
    assert not (tmp_path / "out").exists()


def test_zip_symlink_rejected(pipeline_dir: Path, tmp_path: Path, settings: Settings) -> None:
    path = zip_with_member(pipeline_dir, tmp_path / "model.zip", "unet/link", b"/etc/passwd", mode=0o120777)
    with pytest.raises(InputError, match="symbolic link 'unet/link'"):
        inspect_upload(path, settings=settings)


def test_zip_special_file_rejected(pipeline_dir: Path, tmp_path: Path, settings: Settings) -> None:
    path = zip_with_member(pipeline_dir, tmp_path / "model.zip", "unet/pipe", b"", mode=0o010644)
    with pytest.raises(InputError, match="special file"):
        inspect_upload(path, settings=settings)


def test_zip_duplicate_member_rejected(pipeline_dir: Path, tmp_path: Path, settings: Settings) -> None:
    with pytest.warns(UserWarning, match="Duplicate name"):
        path = zip_with_member(pipeline_dir, tmp_path / "model.zip", "unet/config.json", b"{}")
    with pytest.raises(InputError, match="twice"):
        inspect_upload(path, settings=settings)


def test_zip_too_many_members_rejected(pipeline_dir: Path, tmp_path: Path) -> None:
    path = zip_folder(pipeline_dir, tmp_path / "model.zip")
    with pytest.raises(InputError, match="more than 4 members"):
        inspect_upload(path, settings=Settings(data_dir=tmp_path, max_archive_members=4))


def test_zip_too_large_rejected(pipeline_dir: Path, tmp_path: Path) -> None:
    path = zip_folder(pipeline_dir, tmp_path / "model.zip")
    with pytest.raises(InputError, match="SEALER_MAX_ARCHIVE_BYTES"):
        inspect_upload(path, settings=Settings(data_dir=tmp_path, max_archive_bytes=100_000))


def test_zip_bomb_rejected(pipeline_dir: Path, tmp_path: Path, settings: Settings) -> None:
    path = zip_folder(pipeline_dir, tmp_path / "model.zip")
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("padding.bin", bytes(64 * 1024**2))
    with pytest.raises(InputError, match="zip bomb"):
        inspect_upload(path, settings=settings)


def test_zip_lying_sizes_rejected(pipeline_dir: Path, tmp_path: Path, settings: Settings) -> None:
    # Shrink the size that the central directory declares for model_index.json.
    data = bytearray(zip_folder(pipeline_dir, tmp_path / "model.zip").read_bytes())
    name = b"model_index.json"
    entry = data.index(b"PK\x01\x02")  # central directory record: its name starts at byte 46
    while data[entry + 46 : entry + 46 + len(name)] != name:
        entry = data.index(b"PK\x01\x02", entry + 4)
    (declared,) = struct.unpack_from("<I", data, entry + 24)
    struct.pack_into("<I", data, entry + 24, declared // 2)
    path = write(tmp_path / "lying.zip", bytes(data))
    with pytest.raises(InputError, match="model_index.json' cannot be read"):
        inspect_upload(path, settings=settings)


def test_torch_zip_renamed_rejected(tmp_path: Path, settings: Settings) -> None:
    path = tmp_path / "model.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"a": 1}, protocol=2))
        archive.writestr("archive/data/0", bytes(8))
    with pytest.raises(UnsupportedFormatError, match="data.pkl"):
        inspect_upload(path, settings=settings)


def test_gzip_safetensors_rejected(tmp_path: Path, settings: Settings) -> None:
    import gzip

    path = write(tmp_path / "unet.safetensors.gz", gzip.compress(safetensors_bytes(unet_header(), bytes(20))))
    with pytest.raises(InputError, match="not a readable tar archive"):
        inspect_upload(path, settings=settings)


def tar_with_member(pipeline_dir: Path, path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w:gz") as archive:
        archive.add(pipeline_dir, arcname=".")
        member.size = len(data) if member.isfile() else 0
        archive.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type = kind
    member.linkname = linkname
    return member


@pytest.mark.parametrize(
    ("member", "match"),
    [
        (tar_member("/tmp/evil.txt"), "absolute path"),
        (tar_member("../evil.txt"), "outside the archive"),
        (tar_member("unet/link", tarfile.SYMTYPE, "/etc/passwd"), "has a link"),
        (tar_member("unet/hard", tarfile.LNKTYPE, "model_index.json"), "has a link"),
        (tar_member("unet/device", tarfile.CHRTYPE), "special file"),
        (tar_member("unet/fifo", tarfile.FIFOTYPE), "special file"),
    ],
)
def test_tar_unsafe_member_rejected(
    pipeline_dir: Path, tmp_path: Path, settings: Settings, member: tarfile.TarInfo, match: str
) -> None:
    path = tar_with_member(pipeline_dir, tmp_path / "model.tar.gz", member, b"x")
    with pytest.raises(InputError, match=match):
        inspect_upload(path, settings=settings)
    with pytest.raises(InputError, match=match):
        safe_extract(path, tmp_path / "out", settings)
    assert not (tmp_path / "evil.txt").exists()
    assert not (tmp_path / "out").exists()


def test_tar_too_many_members_rejected(pipeline_dir: Path, tmp_path: Path) -> None:
    path = tar_folder(pipeline_dir, tmp_path / "model.tar.gz")
    with pytest.raises(InputError, match="more than 4 members"):
        inspect_upload(path, settings=Settings(data_dir=tmp_path, max_archive_members=4))


def test_tar_bomb_rejected(pipeline_dir: Path, tmp_path: Path) -> None:
    # A gzip stream has no per-member sizes, so only the whole archive's ratio (about 16 here) is checked.
    member = tar_member("padding.bin")
    path = tar_with_member(pipeline_dir, tmp_path / "model.tar.gz", member, bytes(64 * 1024**2))
    with pytest.raises(InputError, match="zip bomb"):
        inspect_upload(path, settings=Settings(data_dir=tmp_path, max_archive_ratio=8))


def test_truncated_tar_rejected(pipeline_dir: Path, tmp_path: Path, settings: Settings) -> None:
    data = tar_folder(pipeline_dir, tmp_path / "full.tar.gz").read_bytes()
    path = write(tmp_path / "cut.tar.gz", data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated|damaged|cannot be read"):
        inspect_upload(path, settings=settings)


# --- extraction -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_safe_extract_returns_root(pipeline_dir: Path, tmp_path: Path, settings: Settings, kind: str) -> None:
    make = zip_folder if kind == "zip" else tar_folder
    path = make(pipeline_dir, tmp_path / f"model.{kind}", top_level="model")
    root = safe_extract(path, tmp_path / "out", settings)
    assert root == tmp_path / "out" / "model"
    assert (root / "model_index.json").read_bytes() == (pipeline_dir / "model_index.json").read_bytes()
    unet_weights = "unet/diffusion_pytorch_model.safetensors"
    assert (root / unet_weights).read_bytes() == (pipeline_dir / unet_weights).read_bytes()


def test_safe_extract_skips_macos_folder(pipeline_dir: Path, tmp_path: Path, settings: Settings) -> None:
    path = zip_folder(pipeline_dir, tmp_path / "model.zip")
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("__MACOSX/._model_index.json", b"\x00\x05")
    root = safe_extract(path, tmp_path / "out", settings)
    assert root == tmp_path / "out"
    assert not (root / "__MACOSX").exists()


def test_safe_extract_needs_empty_dest(pipeline_dir: Path, tmp_path: Path, settings: Settings) -> None:
    path = zip_folder(pipeline_dir, tmp_path / "model.zip")
    write(tmp_path / "out" / "existing.txt", b"keep me")
    with pytest.raises(ValueError, match="not empty"):
        safe_extract(path, tmp_path / "out", settings)
    assert (tmp_path / "out" / "existing.txt").read_bytes() == b"keep me"


def test_safe_extract_rejects_single_file(tmp_path: Path, settings: Settings) -> None:
    path = write(tmp_path / "unet.safetensors", safetensors_bytes(unet_header(), bytes(20)))
    with pytest.raises(InputError, match="not an archive"):
        safe_extract(path, tmp_path / "out", settings)


def test_formats_imports_no_torch() -> None:
    code = "import sys, core.formats; sys.exit(1 if 'torch' in sys.modules else 0)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr or "core.formats imported torch"
