"""Builders of bad uploads: pickles with a payload, damaged safetensors files, unsafe archives.

Everything here is torch-free except `make_pipeline`, which uses tests.engine_models.
Each builder writes one file and returns its path, so a test can upload it as it is.
"""

import io
import json
import pickle
import shutil
import struct
import tarfile
import zipfile
from pathlib import Path

# One F32 tensor of 4 elements: the data of every hand-made tensor below.
TENSOR_BYTES = 16


class CreatesFile:
    """Unpickling this object would create `marker`: the proof that the server never unpickles."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def pickle_payload(marker: Path, protocol: int) -> bytes:
    return pickle.dumps({"state_dict": CreatesFile(marker)}, protocol=protocol)


def torch_zip_payload(marker: Path) -> bytes:
    """Return a zip laid out as torch.save writes it (`archive/data.pkl` and friends) around the payload."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle_payload(marker, protocol=2))
        archive.writestr("archive/byteorder", b"little")
        archive.writestr("archive/version", b"3\n")
    return buffer.getvalue()


# --- safetensors ---------------------------------------------------------------------------


def safetensors_bytes(header: dict, data: bytes, *, header_size: int | None = None) -> bytes:
    """Serialize a header and a data section; `header_size` overrides the declared header length."""
    encoded = json.dumps(header).encode()
    size = len(encoded) if header_size is None else header_size
    return struct.pack("<Q", size) + encoded + data


def tensor_entry(start: int, end: int, shape: tuple[int, ...] = (4,)) -> dict:
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [start, end]}


def unet_header(**entries: dict) -> dict:
    """A header with diffusers UNet key names, one 16-byte tensor each, contiguous from 0."""
    names = ["conv_in.weight", "time_embedding.linear_1.weight", "down_blocks.0.resnets.0.conv1.weight", "conv_out.weight"]
    header = {name: tensor_entry(index * TENSOR_BYTES, (index + 1) * TENSOR_BYTES) for index, name in enumerate(names)}
    header.update(entries)
    return header


def valid_unet_bytes() -> bytes:
    return safetensors_bytes(unet_header(), bytes(4 * TENSOR_BYTES))


def text_model_bytes() -> bytes:
    """A valid safetensors file with CLIP text encoder keys: the wrong architecture for a UNet upload."""
    names = ["text_model.embeddings.token_embedding.weight", "text_model.final_layer_norm.weight"]
    header = {name: tensor_entry(index * TENSOR_BYTES, (index + 1) * TENSOR_BYTES) for index, name in enumerate(names)}
    return safetensors_bytes(header, bytes(2 * TENSOR_BYTES))


def overlapping_bytes() -> bytes:
    """conv_out.weight starts 8 bytes before the tensor ahead of it ends."""
    header = unet_header(**{"conv_out.weight": tensor_entry(2 * TENSOR_BYTES + 8, 3 * TENSOR_BYTES + 8)})
    return safetensors_bytes(header, bytes(3 * TENSOR_BYTES + 8))


def past_end_bytes() -> bytes:
    """Offsets that run 16 bytes past the data section, in a file that is otherwise complete."""
    return safetensors_bytes(unet_header(), bytes(3 * TENSOR_BYTES))


# --- diffusers folders and archives ----------------------------------------------------------


def make_pipeline(folder: Path) -> Path:
    """Save a tiny float16 diffusers pipeline (about 7 MB) with tests.engine_models."""
    import torch

    from tests.engine_models import make_tiny_pipeline_dir

    return make_tiny_pipeline_dir(folder, dtype=torch.float16)


def copy_pipeline(pipeline: Path, folder: Path) -> Path:
    return Path(shutil.copytree(pipeline, folder))


def zip_pipeline(pipeline: Path, path: Path, *, skip: tuple[str, ...] = ()) -> Path:
    """Zip a pipeline folder without compression (fast); members under `skip` prefixes are left out."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for file in sorted(pipeline.rglob("*")):
            name = file.relative_to(pipeline).as_posix()
            if file.is_file() and not name.startswith(skip):
                archive.write(file, name)
    return path


def zip_with_member(
    base_zip: Path, path: Path, name: str, data: bytes = b"x", *, mode: int | None = None, compress: bool = False
) -> Path:
    """Copy `base_zip` and append one member; `mode` sets its Unix file type and permissions."""
    shutil.copyfile(base_zip, path)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as archive:
        info = zipfile.ZipInfo(name)
        info.compress_type = archive.compression
        if mode is not None:
            info.create_system = 3
            info.external_attr = mode << 16
        archive.writestr(info, data)
    return path


def zip_with_many_members(base_zip: Path, path: Path, count: int) -> Path:
    shutil.copyfile(base_zip, path)
    with zipfile.ZipFile(path, "a") as archive:
        for index in range(count):
            archive.writestr(f"extra/file-{index:05d}.txt", b"")
    return path


def tar_pipeline(pipeline: Path, path: Path) -> Path:
    """Write an uncompressed tar of a pipeline folder, so that members can be appended."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        archive.add(pipeline, arcname=".")
    return path


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type = kind
    member.linkname = linkname
    return member


def tar_with_member(base_tar: Path, path: Path, member: tarfile.TarInfo, data: bytes = b"x") -> Path:
    shutil.copyfile(base_tar, path)
    with tarfile.open(path, "a") as archive:
        member.size = len(data) if member.isfile() else 0
        archive.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


def tar_gz_bomb(pipeline: Path, path: Path, zero_bytes: int) -> Path:
    """A gzip tar whose first member is `zero_bytes` of zeros, so the archive expands about 1000 times."""
    with tarfile.open(path, "w:gz", compresslevel=1) as archive:
        member = tarfile.TarInfo("padding.bin")
        member.size = zero_bytes
        archive.addfile(member, _Zeros(zero_bytes))
        archive.add(pipeline / "model_index.json", arcname="model_index.json")
    return path


class _Zeros(io.RawIOBase):
    """A readable stream of `size` zero bytes that never keeps them all in memory."""

    def __init__(self, size: int):
        self.remaining = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self.remaining)
        buffer[:count] = bytes(count)
        self.remaining -= count
        return count
