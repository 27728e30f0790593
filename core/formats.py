"""Torch-free checks of uploaded checkpoints: format detection, safetensors headers, archives.

The API runs these checks before it queues a job, so this module must not import torch.
Only safetensors files and diffusers folders (plain, zip or tar) are accepted. Pickle
formats are rejected by name and by content, because unpickling runs arbitrary code and
even `torch.load(weights_only=True)` has had remote-code-execution bugs. Nothing here
unpickles, follows a link or writes outside the folder it was given.

The file's content decides its format, not its name: a safetensors file renamed `.ckpt`
is accepted as safetensors (parsing safetensors runs no code, whatever the name), and a
pickle renamed `.safetensors` is rejected as a pickle. A warning in UploadInfo.warnings
records when name and content disagree.
"""

import json
import logging
import math
import os
import re
import shutil
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal

from core.errors import InputError, UnsupportedFormatError
from core.settings import Settings, get_settings

logger = logging.getLogger(__name__)

UploadFormat = Literal[
    "diffusers_zip",
    "diffusers_tar",
    "diffusers_dir",
    "safetensors_single",
    "safetensors_unet",
]

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
PICKLE_ADVICE = (
    "convert it to safetensors first (for example `safetensors.torch.save_file(state_dict, "
    "'model.safetensors')` in a trusted, sandboxed environment), because loading a pickle can run arbitrary "
    "code and even torch.load(weights_only=True) has had remote-code-execution bugs"
)
RESAVE_ADVICE = "save the model again (save_pretrained or safetensors.torch.save_file) and upload the new file"

# Bits per element of every safetensors dtype, sub-byte float types included.
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
}

# Key prefixes of the original (CompVis / LDM) single-file Stable Diffusion layout.
SINGLE_FILE_UNET_PREFIX = "model.diffusion_model."
SINGLE_FILE_VAE_PREFIX = "first_stage_model."
SINGLE_FILE_TEXT_PREFIXES = ("cond_stage_model.", "conditioner.")
SINGLE_FILE_EMA_PREFIX = "model_ema."

REQUIRED_COMPONENTS = ("unet", "text_encoder", "tokenizer", "scheduler")
OPTIONAL_COMPONENTS = ("vae",)

# Weight file stems as diffusers and transformers save them.
WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}

MODEL_INDEX = "model_index.json"
MAX_SMALL_FILE_BYTES = 4 * 1024**2  # configs and indexes read into memory
SMALL_FILE_NAMES = {MODEL_INDEX, "config.json", "scheduler_config.json"}
APPLE_METADATA_FOLDER = "__MACOSX"  # resource forks that macOS adds to zip files
COPY_CHUNK_BYTES = 4 * 1024**2
MIN_RATIO_CHECK_BYTES = 1024**2  # smaller members (configs, vocabularies) may compress well
ARCHIVE_KINDS = ("zip", "tar", "gzip", "bzip2", "xz")


@dataclass
class TensorInfo:
    """One tensor entry of a safetensors header; offsets are relative to the data section."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class SafetensorsHeader:
    """A validated safetensors header: tensors in file order, metadata, and where the data starts."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_offset: int

    @property
    def dtypes(self) -> list[str]:
        return sorted({info.dtype for info in self.tensors.values()})

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())


@dataclass
class UploadInfo:
    """Format and facts of a checked upload, for the API's response and the job record."""

    format: UploadFormat
    filename: str
    size_bytes: int
    tensor_count: int
    dtypes: list[str]
    tensor_bytes: int
    components: list[str]
    unet_dtypes: list[str] = field(default_factory=list)
    root: str = ""
    warnings: list[str] = field(default_factory=list)
    image_size: tuple[int, int] | None = None  # (width, height) from a diffusers folder's configs

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "filename": self.filename,
            "size_bytes": self.size_bytes,
            "tensor_count": self.tensor_count,
            "dtypes": self.dtypes,
            "tensor_bytes": self.tensor_bytes,
            "components": self.components,
            "unet_dtypes": self.unet_dtypes,
            "root": self.root,
            "warnings": self.warnings,
            "image_size": list(self.image_size) if self.image_size else None,
        }


@dataclass
class _Listing:
    """The files of a diffusers folder or archive, relative POSIX paths, as the layout check needs them."""

    file_sizes: dict[str, int] = field(default_factory=dict)
    small_files: dict[str, bytes] = field(default_factory=dict)
    headers: dict[str, SafetensorsHeader] = field(default_factory=dict)


def _reject(message: str) -> InputError:
    return InputError(message, field="checkpoint")


def _reject_format(message: str) -> UnsupportedFormatError:
    return UnsupportedFormatError(message, field="checkpoint")


# --- content sniffing ---------------------------------------------------------------


def looks_like_pickle(head: bytes) -> bool:
    """Tell whether the first bytes of a file look like a pickle stream (any protocol).

    Protocols 2 to 5 start with the PROTO opcode 0x80 and the protocol number; torch's
    legacy format is such a pickle. Protocols 0 and 1 have no marker, so their common
    opening opcodes are matched, which is good enough to word an error message.
    """
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    opening = (b"(", b"}", b"]", b"c")
    second = (b"(", b"d", b"q", b"X", b"c", b"\n", b"V", b"S", b"I", b"}", b"]", b"M", b"K")
    return len(head) >= 2 and head[:1] in opening and head[1:2] in second


def _sniff(head: bytes) -> str:
    """Name the container format that a file starts with; the tar magic sits at byte 257, so pass 262 bytes or more."""
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"BZh"):
        return "bzip2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if looks_like_pickle(head):
        return "pickle"
    return "unknown"


def _has_pickle_suffix(name: str) -> bool:
    return name.lower().endswith(PICKLE_SUFFIXES)


def is_apple_metadata(relative_path: str) -> bool:
    """Tell whether a path is macOS metadata (`__MACOSX/`, AppleDouble `._name`), which is skipped, never read.

    Finder's zip and macOS tar add these next to real files, so `._model.safetensors` can
    sit beside `model.safetensors` without being a tensor file.
    """
    parts = relative_path.split("/")
    return parts[0] == APPLE_METADATA_FOLDER or parts[-1].startswith("._")


# --- safetensors headers ------------------------------------------------------------


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _read_exact(stream: IO[bytes], size: int) -> bytes:
    chunks = []
    remaining = size
    while remaining > 0:
        chunk = stream.read(min(remaining, COPY_CHUNK_BYTES))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_safetensors_header(
    stream: IO[bytes], total_size: int, name: str, *, max_header_bytes: int
) -> SafetensorsHeader:
    """Read and validate a safetensors header from `stream`, positioned at the file's start.

    The format is an 8-byte little-endian header length N, N bytes of JSON, then the data
    section. The checks match what the safetensors library enforces when it loads. Every
    tensor's byte range must match its dtype and shape, and the ranges must be contiguous
    from 0 without overlaps or gaps. The data section must end exactly at the end of the
    file. Raises InputError naming the problem, and reads at most 8 + N bytes.
    """
    if total_size == 0:
        raise _reject(f"{name} is empty (0 bytes); upload the complete file again")
    prefix = _read_exact(stream, 8)
    if len(prefix) < 8:
        raise _reject(
            f"{name} is truncated: {total_size} bytes is too short for a safetensors header; upload the complete file"
        )
    (header_size,) = struct.unpack("<Q", prefix)

    if header_size > max_header_bytes:
        raise _reject(
            f"{name} declares a safetensors header of {header_size} bytes, above the limit of {max_header_bytes}; "
            f"the file is corrupt or not safetensors, so {RESAVE_ADVICE} "
            "(the operator may raise SEALER_MAX_SAFETENSORS_HEADER_BYTES for a file they trust)"
        )
    if 8 + header_size > total_size:
        raise _reject(
            f"{name} is truncated: its header needs {8 + header_size} bytes but the file has {total_size}; "
            "upload the complete file"
        )
    raw_header = _read_exact(stream, header_size)
    if len(raw_header) < header_size:
        raise _reject(f"{name} is truncated inside its header; upload the complete file")

    try:
        header = json.loads(raw_header.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as error:
        raise _reject(
            f"{name} has a safetensors header that is not valid JSON ({error}); the file is corrupt, so {RESAVE_ADVICE}"
        ) from None
    if not isinstance(header, dict):
        raise _reject(
            f"{name} has a safetensors header that is not a JSON object; the file is corrupt, so {RESAVE_ADVICE}"
        )

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _reject(
            f"{name} has `__metadata__` that is not a map of strings to strings; the file is corrupt, so {RESAVE_ADVICE}"
        )

    tensors = {key: _parse_tensor_entry(name, key, entry) for key, entry in header.items()}
    data_size = total_size - 8 - header_size
    _check_tensor_ranges(name, tensors, data_size)
    return SafetensorsHeader(tensors=tensors, metadata=metadata, data_offset=8 + header_size)


def _parse_tensor_entry(name: str, key: str, entry: Any) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _reject(f"{name}: header entry {key!r} is not a JSON object; the file is corrupt, so {RESAVE_ADVICE}")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPE_BITS:
        raise _reject(f"{name}: tensor {key!r} has unknown dtype {dtype!r}; known: {sorted(SAFETENSORS_DTYPE_BITS)}")
    if not isinstance(shape, list) or not all(type(size) is int and size >= 0 for size in shape):
        raise _reject(f"{name}: tensor {key!r} has invalid shape {shape!r}; a shape is a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(offset) is int and offset >= 0 for offset in offsets)
        or offsets[0] > offsets[1]
    ):
        raise _reject(
            f"{name}: tensor {key!r} has invalid data_offsets {offsets!r}; expected [start, end] with start <= end"
        )

    info = TensorInfo(dtype=dtype, shape=tuple(shape), start=offsets[0], end=offsets[1])
    bits = math.prod(info.shape) * SAFETENSORS_DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != info.nbytes:
        raise _reject(
            f"{name}: tensor {key!r} is {dtype} with shape {list(info.shape)}, which needs {bits / 8:g} bytes, "
            f"but its data_offsets span {info.nbytes}; the file is corrupt, so {RESAVE_ADVICE}"
        )
    return info


def _check_tensor_ranges(name: str, tensors: dict[str, TensorInfo], data_size: int) -> None:
    position = 0
    previous = None
    for key, info in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if info.end > data_size:
            raise _reject(
                f"{name}: tensor {key!r} ends at byte {info.end} of the data section, past its end at {data_size}; "
                "the file is truncated or corrupt, upload the complete file"
            )
        if info.start < position:
            raise _reject(
                f"{name}: tensor {key!r} (bytes {info.start}-{info.end}) overlaps tensor {previous!r}; "
                f"the file is corrupt, so {RESAVE_ADVICE}"
            )
        if info.start > position:
            raise _reject(
                f"{name}: {info.start - position} unused bytes before tensor {key!r}; the file is corrupt, so {RESAVE_ADVICE}"
            )
        position = info.end
        previous = key
    if position != data_size:
        raise _reject(
            f"{name}: {data_size - position} bytes follow the last tensor; the file is corrupt or was appended to, "
            f"so {RESAVE_ADVICE}"
        )


def read_safetensors_file(
    path: Path, settings: Settings | None = None, *, name: str | None = None
) -> SafetensorsHeader:
    """Validate the safetensors file at `path` and return its header; pickles get a pickle-specific error."""
    settings = settings or get_settings()
    name = name or path.name
    size = path.stat().st_size
    with path.open("rb") as stream:
        head = stream.read(300)
        kind = _sniff(head) if size else "empty"
        _reject_non_safetensors(name, kind)
        stream.seek(0)
        return read_safetensors_header(stream, size, name, max_header_bytes=settings.max_safetensors_header_bytes)


def _reject_non_safetensors(name: str, kind: str) -> None:
    if kind == "pickle":
        raise _reject_format(f"{name} is a pickle file, not safetensors; {PICKLE_ADVICE}")
    if kind == "zip":
        raise _reject_format(
            f"{name} is a zip archive, not safetensors (torch.save writes such a zip around a pickle); {PICKLE_ADVICE}"
        )


# --- classification of a single safetensors file --------------------------------------


def classify_safetensors_keys(keys: list[str], name: str) -> tuple[UploadFormat, list[str]]:
    """Tell a single-file Stable Diffusion checkpoint from a diffusers UNet state dict, by key names.

    Returns the format and the components the file contains. Raises InputError naming what
    the file looks like when it is neither (a text encoder, a VAE, a LoRA adapter).
    """
    if not keys:
        raise _reject(f"{name} contains no tensors; upload a model checkpoint")
    key_set = set(keys)

    if any(key.startswith(SINGLE_FILE_UNET_PREFIX) for key in keys):
        components = ["unet"]
        if any(key.startswith(SINGLE_FILE_VAE_PREFIX) for key in keys):
            components.append("vae")
        if any(key.startswith(SINGLE_FILE_TEXT_PREFIXES) for key in keys):
            components.append("text_encoder")
        return "safetensors_single", components

    if {"conv_in.weight", "conv_out.weight"} <= key_set and any(key.startswith("down_blocks.") for key in keys):
        if not any(key.startswith(("time_embedding.", "time_embed.")) for key in keys):
            raise _reject(f"{name} has UNet-like keys but no time embedding; it is not a diffusion UNet")
        if any(key.startswith("encoder.") or key.startswith("decoder.") for key in keys):
            raise _reject(f"{name} mixes UNet and VAE keys; upload a UNet state dict or a full checkpoint")
        return "safetensors_unet", ["unet"]

    raise _reject(f"{name} {_describe_foreign_keys(keys)}")


def _describe_foreign_keys(keys: list[str]) -> str:
    sample = ", ".join(repr(key) for key in keys[:3])
    if any("lora" in key.lower() for key in keys):
        return (
            f"is a LoRA adapter (keys like {sample}), not a model; merge it into its base model "
            "and upload the merged checkpoint"
        )
    if any(key.startswith(("text_model.", "embeddings.token_embedding", "encoder.layers.")) for key in keys):
        return (
            f"contains a text encoder (keys like {sample}), not a UNet; upload the UNet's state dict, "
            "a full single-file checkpoint or a diffusers folder"
        )
    if any(key.startswith(("encoder.down", "decoder.up", "quant_conv.")) for key in keys):
        return f"contains a VAE (keys like {sample}), not a UNet; upload the UNet's state dict or a full checkpoint"
    return (
        f"is not a Stable Diffusion UNet (keys like {sample}); expected diffusers UNet keys "
        f"(`conv_in.weight`, `down_blocks.*`) or single-file keys (`{SINGLE_FILE_UNET_PREFIX}*`)"
    )


def _inspect_safetensors(path: Path, filename: str, size: int, settings: Settings, warnings: list[str]) -> UploadInfo:
    header = read_safetensors_file(path, settings, name=filename)
    keys = list(header.tensors)
    upload_format, components = classify_safetensors_keys(keys, filename)

    if upload_format == "safetensors_single":
        unet_infos = [info for key, info in header.tensors.items() if key.startswith(SINGLE_FILE_UNET_PREFIX)]
        if any(key.startswith(SINGLE_FILE_EMA_PREFIX) for key in keys):
            warnings.append(
                f"{filename} also contains EMA weights (`{SINGLE_FILE_EMA_PREFIX}*`); "
                "the sanitized file leaves them out because they still carry the backdoor"
            )
    else:
        unet_infos = list(header.tensors.values())

    return UploadInfo(
        format=upload_format,
        filename=filename,
        size_bytes=size,
        tensor_count=len(header.tensors),
        dtypes=header.dtypes,
        tensor_bytes=header.nbytes,
        components=components,
        unet_dtypes=sorted({info.dtype for info in unet_infos}),
        warnings=warnings,
    )


# --- diffusers layout -----------------------------------------------------------------


def find_weight_files(file_names: list[str], stem: str, where: str) -> tuple[str | None, list[str]]:
    """Pick the weight files that diffusers or transformers would load from one component folder.

    `file_names` are the plain file names in the folder. Returns the variant (None for the
    plain `<stem>.safetensors`) and a one-item list: the safetensors file, or the shard
    index (`.index.json`) that names the shards. Raises InputError when only pickle weights
    exist or the variant is ambiguous.
    """
    names = set(file_names)
    plain = f"{stem}.safetensors"
    if plain in names:
        return None, [plain]
    if f"{plain}.index.json" in names:
        return None, [f"{plain}.index.json"]

    variant_pattern = re.compile(rf"^{re.escape(stem)}\.([A-Za-z0-9_-]+)\.safetensors(\.index\.json)?$")
    variants: dict[str, str] = {}
    for file_name in sorted(names):
        match = variant_pattern.match(file_name)
        if not match or re.search(r"-\d+-of-\d+$", match.group(1)):
            continue  # not a variant, or one shard of a sharded variant
        if match.group(1) not in variants or match.group(2) is None:
            variants[match.group(1)] = file_name
    shard_pattern = re.compile(rf"^{re.escape(stem)}-\d+-of-\d+\.safetensors$")
    if len(variants) == 1:
        variant, file_name = next(iter(variants.items()))
        return variant, [file_name]
    if len(variants) > 1:
        raise _reject(
            f"{where} has several weight variants {sorted(variants)} and no plain {plain}; "
            "keep the one to sanitize and remove the others"
        )
    if any(shard_pattern.match(file_name) for file_name in names):
        raise _reject(f"{where} has safetensors shards but no {plain}.index.json; upload the index file too")

    pickles = sorted(file_name for file_name in names if _has_pickle_suffix(file_name))
    if pickles:
        raise _reject_format(f"{where} has only pickle weights ({', '.join(pickles)}); {PICKLE_ADVICE}")
    raise _reject(f"{where} has no weights ({plain} is missing); save the component with safetensors")


def _shard_names(index_bytes: bytes, where: str) -> list[str]:
    """Return the shard file names that a safetensors index maps tensors to."""
    try:
        index = json.loads(index_bytes)
        shards = sorted(set(index["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise _reject(
            f"{where}: the safetensors index is not valid JSON with a `weight_map`; the file is corrupt"
        ) from None
    for shard in shards:
        if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard in ("", ".", ".."):
            raise _reject(
                f"{where}: the safetensors index names an invalid shard file {shard!r}; expected a plain file name"
            )
    return shards


def _load_json_object(data: bytes | None, where: str) -> dict[str, Any]:
    if data is None:
        raise _reject(f"{where} is missing or larger than {MAX_SMALL_FILE_BYTES} bytes; save the pipeline again")
    try:
        value = json.loads(data)
    except ValueError as error:
        raise _reject(f"{where} is not valid JSON ({error}); save the pipeline again") from None
    if not isinstance(value, dict):
        raise _reject(f"{where} is not a JSON object; save the pipeline again")
    return value


def _folder_files(listing: _Listing, prefix: str, component: str) -> list[str]:
    folder = f"{prefix}{component}/"
    return [
        path[len(folder) :] for path in listing.file_sizes if path.startswith(folder) and "/" not in path[len(folder) :]
    ]


def _component_weights(listing: _Listing, prefix: str, component: str) -> tuple[str | None, list[str]]:
    """Return the variant and the safetensors paths (relative to the root) of one component."""
    where = f"the {component} folder"
    variant, names = find_weight_files(_folder_files(listing, prefix, component), WEIGHT_STEMS[component], where)
    if names[0].endswith(".index.json"):
        index_path = f"{prefix}{component}/{names[0]}"
        names = _shard_names(listing.small_files.get(index_path, b""), f"{component}/{names[0]}")
    paths = [f"{prefix}{component}/{name}" for name in names]
    missing = [path for path in paths if path not in listing.headers]
    if missing:
        raise _reject(f"{where}: shard {missing[0]!r} named by the index is missing; upload every shard")
    return variant, paths


def _check_diffusers_layout(
    listing: _Listing, prefix: str, filename: str, upload_format: UploadFormat, warnings: list[str]
) -> UploadInfo:
    """Check that `listing` (under `prefix`) is a loadable Stable Diffusion diffusers folder."""
    model_index = _load_json_object(listing.small_files.get(f"{prefix}{MODEL_INDEX}"), MODEL_INDEX)
    folders = {
        path[len(prefix) :].split("/", 1)[0]
        for path in listing.file_sizes
        if path.startswith(prefix) and "/" in path[len(prefix) :]
    }

    missing = [component for component in REQUIRED_COMPONENTS if component not in folders]
    if missing:
        raise _reject(
            f"the diffusers folder lacks the component folder(s) {', '.join(missing)}; Sealer needs "
            f"{', '.join(REQUIRED_COMPONENTS)} (vae is optional), so save the complete pipeline with save_pretrained"
        )
    vae_entry = model_index.get("vae")
    vae_listed = isinstance(vae_entry, list) and len(vae_entry) == 2 and vae_entry[1] is not None
    if vae_listed and "vae" not in folders:
        raise _reject(f"{MODEL_INDEX} lists a vae but the vae folder is missing; upload the complete pipeline")

    components = list(REQUIRED_COMPONENTS) + (["vae"] if "vae" in folders else [])
    for component in ("unet", "text_encoder", "vae"):
        if component in components:
            _load_json_object(listing.small_files.get(f"{prefix}{component}/config.json"), f"{component}/config.json")
    _load_json_object(
        listing.small_files.get(f"{prefix}scheduler/scheduler_config.json"), "scheduler/scheduler_config.json"
    )

    tokenizer_files = set(_folder_files(listing, prefix, "tokenizer"))
    if "tokenizer.json" not in tokenizer_files and not {"vocab.json", "merges.txt"} <= tokenizer_files:
        raise _reject(
            "the tokenizer folder has neither tokenizer.json nor vocab.json with merges.txt; "
            "save the tokenizer with save_pretrained"
        )

    unet_paths: list[str] = []
    for component in ("unet", "text_encoder", "vae"):
        if component in components:
            _, paths = _component_weights(listing, prefix, component)
            if component == "unet":
                unet_paths = paths
    _check_unet_shapes(listing, prefix, components, unet_paths)

    ignored = sorted(path for path in listing.file_sizes if _has_pickle_suffix(path))
    if ignored:
        warnings.append(
            f"pickle files are never loaded and are left out of the sanitized model: {', '.join(ignored[:5])}"
            + (f" and {len(ignored) - 5} more" if len(ignored) > 5 else "")
        )

    headers = list(listing.headers.values())
    unet_headers = [listing.headers[path] for path in unet_paths]
    return UploadInfo(
        format=upload_format,
        filename=filename,
        size_bytes=sum(listing.file_sizes.values()),
        tensor_count=sum(len(header.tensors) for header in headers),
        dtypes=sorted({dtype for header in headers for dtype in header.dtypes}),
        tensor_bytes=sum(header.nbytes for header in headers),
        components=components,
        unet_dtypes=sorted({dtype for header in unet_headers for dtype in header.dtypes}),
        root=prefix.rstrip("/"),
        image_size=_image_size(listing, prefix, components),
        warnings=warnings,
    )


def _config_int(config: dict[str, Any], key: str) -> int | None:
    value = config.get(key)
    return value if type(value) is int else None


def _check_unet_shapes(listing: _Listing, prefix: str, components: list[str], unet_paths: list[str]) -> None:
    """Check, torch-free, that the UNet weights fit unet/config.json and the configs of the other components.

    Only shapes that a config fixes directly are compared: conv_in, conv_out and the
    cross-attention key projections. The worker compares every tensor when it builds the model.
    """
    config = _load_json_object(listing.small_files.get(f"{prefix}unet/config.json"), "unet/config.json")
    tensors = {key: info for path in unet_paths for key, info in listing.headers[path].tensors.items()}
    block_out_channels = config.get("block_out_channels")
    first_block = block_out_channels[0] if isinstance(block_out_channels, list) and block_out_channels else None
    first_block = first_block if type(first_block) is int else None
    leading_sizes = {
        "conv_in.weight": (first_block, _config_int(config, "in_channels")),
        "conv_out.weight": (_config_int(config, "out_channels"), first_block),
    }
    for key, expected in leading_sizes.items():
        info = tensors.get(key)
        if info is None:
            raise _reject(
                f"the unet weights have no {key}, so they are not a diffusers UNet; save the UNet with save_pretrained"
            )
        if len(info.shape) < 2 or any(size is not None and size != found for size, found in zip(expected, info.shape)):
            expected_text = ", ".join("?" if size is None else str(size) for size in expected)
            raise _reject(
                f"the unet weights do not match unet/config.json: {key} has shape {list(info.shape)} but the config "
                f"needs [{expected_text}, ...]; upload the weights together with the config they were saved with"
            )

    cross_attention_dim = _config_int(config, "cross_attention_dim")
    if cross_attention_dim is not None:
        for key, info in sorted(tensors.items()):
            if key.endswith("attn2.to_k.weight") and info.shape[-1:] != (cross_attention_dim,):
                raise _reject(
                    f"the unet weights do not match unet/config.json: {key} has shape {list(info.shape)} but "
                    f"cross_attention_dim is {cross_attention_dim}; upload the weights together with the config "
                    "they were saved with"
                )

    text_config = _load_json_object(listing.small_files.get(f"{prefix}text_encoder/config.json"), "text_encoder/config.json")
    hidden_size = _config_int(text_config, "hidden_size")
    projected = config.get("encoder_hid_dim") is not None  # the UNet then projects the text width itself
    if cross_attention_dim and hidden_size and not projected and hidden_size != cross_attention_dim:
        raise _reject(
            f"the text encoder's hidden size is {hidden_size} but the UNet's cross_attention_dim is "
            f"{cross_attention_dim}; the components come from different models, so upload a pipeline whose "
            "components come from one model"
        )
    if "vae" in components:
        vae_config = _load_json_object(listing.small_files.get(f"{prefix}vae/config.json"), "vae/config.json")
        latent_channels = _config_int(vae_config, "latent_channels")
        in_channels = _config_int(config, "in_channels")
        if latent_channels and in_channels and latent_channels != in_channels:
            raise _reject(
                f"the VAE makes {latent_channels}-channel latents but the UNet takes {in_channels} channels; the "
                "components come from different models, so upload a pipeline whose components come from one model"
            )


def _image_size(listing: _Listing, prefix: str, components: list[str]) -> tuple[int, int] | None:
    """Return (width, height) of the images that a diffusers pipeline generates, or None when its configs omit it.

    The UNet's sample_size counts latent pixels, and a VAE doubles it once per down block after the first.
    """
    config = _load_json_object(listing.small_files.get(f"{prefix}unet/config.json"), "unet/config.json")
    sample_size = config.get("sample_size")
    if type(sample_size) is int:
        height = width = sample_size
    elif isinstance(sample_size, list) and len(sample_size) == 2 and all(type(size) is int for size in sample_size):
        height, width = sample_size
    else:
        return None
    if "vae" in components:
        vae_config = _load_json_object(listing.small_files.get(f"{prefix}vae/config.json"), "vae/config.json")
        vae_blocks = vae_config.get("block_out_channels")
        if not isinstance(vae_blocks, list) or not vae_blocks:
            return None
        scale = 2 ** (len(vae_blocks) - 1)
        height, width = height * scale, width * scale
    return width, height


def _is_small_file(relative_path: str, size: int) -> bool:
    name = relative_path.rsplit("/", 1)[-1]
    return size <= MAX_SMALL_FILE_BYTES and (name in SMALL_FILE_NAMES or name.endswith(".safetensors.index.json"))


def _list_directory(root: Path, settings: Settings) -> _Listing:
    """List a diffusers folder without following links; validate every safetensors header in it."""
    listing = _Listing()
    total_bytes = 0
    for folder, dir_names, file_names in os.walk(root, followlinks=False):
        folder_path = Path(folder)
        for entry_name in [*dir_names, *file_names]:
            entry = folder_path / entry_name
            relative = entry.relative_to(root).as_posix()
            mode = entry.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise _reject(
                    f"the folder contains a symbolic link {relative!r}; links are never followed, "
                    "so copy the folder with links resolved (cp -rL) and upload the copy"
                )
            if entry_name in file_names and not stat.S_ISREG(mode):
                raise _reject(f"the folder contains {relative!r}, which is not a regular file; remove it")

        for file_name in file_names:
            path = folder_path / file_name
            relative = path.relative_to(root).as_posix()
            if is_apple_metadata(relative):
                continue
            size = path.stat().st_size
            listing.file_sizes[relative] = size
            total_bytes += size
            if len(listing.file_sizes) > settings.max_archive_members:
                raise _reject(
                    f"the folder has more than {settings.max_archive_members} files; "
                    "remove what the pipeline does not need (SEALER_MAX_ARCHIVE_MEMBERS sets the limit)"
                )
            if total_bytes > settings.max_archive_bytes:
                raise _reject(
                    f"the folder contains more than {settings.max_archive_bytes} bytes; "
                    "remove what the pipeline does not need (SEALER_MAX_ARCHIVE_BYTES sets the limit)"
                )
            if _is_small_file(relative, size):
                listing.small_files[relative] = path.read_bytes()
            if file_name.endswith(".safetensors"):
                listing.headers[relative] = read_safetensors_file(path, settings, name=relative)
    return listing


def _diffusers_prefix(paths: list[str], where: str) -> str:
    """Return the folder prefix ("" or "name/") of the diffusers root among `paths`."""
    if MODEL_INDEX in paths:
        return ""
    top_level = {path.split("/", 1)[0] for path in paths}
    if len(top_level) == 1:
        (folder,) = top_level
        if f"{folder}/{MODEL_INDEX}" in paths:
            return f"{folder}/"
    raise _reject(
        f"{where} has no {MODEL_INDEX} at its root or inside one top-level folder; it is not a diffusers pipeline. "
        "Save the pipeline with save_pretrained and archive that folder, or upload a .safetensors file"
    )


# --- archives -------------------------------------------------------------------------


def _normalize_member_name(name: str, archive_name: str) -> str:
    """Return the member's relative POSIX path, or raise for absolute paths and `..`."""
    if not name or "\x00" in name:
        raise _reject(f"{archive_name} has a member with an empty or invalid name; rebuild the archive")
    unified = name.replace("\\", "/")
    if unified.startswith("/") or re.match(r"^[A-Za-z]:", unified):
        raise _reject(
            f"{archive_name} has a member with an absolute path {name!r}; archive the folder with relative paths"
        )
    parts = [part for part in PurePosixPath(unified).parts if part not in ("", ".")]
    if ".." in parts:
        raise _reject(
            f"{archive_name} has a member {name!r} that points outside the archive with `..`; rebuild the archive"
        )
    return "/".join(parts)


class _ArchiveBudget:
    """Running count of an archive's members and bytes, checked against the limits in settings."""

    def __init__(self, archive_name: str, archive_size: int, settings: Settings):
        self.archive_name = archive_name
        self.archive_size = max(archive_size, 1)
        self.settings = settings
        self.members = 0
        self.total_bytes = 0

    def add_member(self) -> None:
        self.members += 1
        if self.members > self.settings.max_archive_members:
            raise _reject(
                f"{self.archive_name} has more than {self.settings.max_archive_members} members; "
                "archive only the pipeline folder (SEALER_MAX_ARCHIVE_MEMBERS sets the limit)"
            )

    def add_bytes(self, size: int) -> None:
        self.total_bytes += size
        if self.total_bytes > self.settings.max_archive_bytes:
            raise _reject(
                f"{self.archive_name} unpacks to more than {self.settings.max_archive_bytes} bytes; "
                "archive only the pipeline folder (SEALER_MAX_ARCHIVE_BYTES sets the limit)"
            )

    def check_ratio(self, size: int | None = None, compressed_size: int | None = None, member: str = "") -> None:
        """Check the whole archive's expansion, or one member's when its compressed size is known."""
        if member:
            if size is None or compressed_size is None or size < MIN_RATIO_CHECK_BYTES:
                return
            subject, unpacked, ratio = f"member {member!r}", size, size / max(compressed_size, 1)
        else:
            subject, unpacked, ratio = "it", self.total_bytes, self.total_bytes / self.archive_size
        if ratio > self.settings.max_archive_ratio:
            raise _reject(
                f"{self.archive_name}: {subject} unpacks to {unpacked} bytes, {ratio:.0f} times its compressed size, "
                f"above the limit of {self.settings.max_archive_ratio:g} (SEALER_MAX_ARCHIVE_RATIO); model weights "
                "barely compress, so this looks like a zip bomb. Rebuild the archive from the pipeline folder"
            )


MemberOpener = Callable[[], IO[bytes]]
MemberVisitor = Callable[[str, int, MemberOpener], None]


def _zip_members(archive: zipfile.ZipFile, archive_name: str, budget: _ArchiveBudget, visit: MemberVisitor) -> None:
    """Check every zip member's name, type and size, then call `visit` on each regular file."""
    files = []
    seen: set[str] = set()
    for info in archive.infolist():
        budget.add_member()
        relative = _normalize_member_name(info.filename, archive_name)
        file_type = stat.S_IFMT(info.external_attr >> 16)
        if file_type == stat.S_IFLNK:
            raise _reject(
                f"{archive_name} has a symbolic link {info.filename!r}; links are not allowed, archive real files"
            )
        if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise _reject(f"{archive_name} has a special file {info.filename!r}; archive only regular files")
        if info.flag_bits & 0x1:
            raise _reject(f"{archive_name} has an encrypted member {info.filename!r}; upload an unencrypted archive")
        if info.is_dir() or not relative:
            continue
        if relative in seen:
            raise _reject(f"{archive_name} has the member {relative!r} twice; rebuild the archive")
        seen.add(relative)
        budget.add_bytes(info.file_size)
        budget.check_ratio(info.file_size, info.compress_size, relative)
        files.append((info, relative))
    budget.check_ratio()
    _reject_torch_zip([relative for _, relative in files], archive_name)

    for info, relative in files:
        try:
            visit(relative, info.file_size, lambda info=info: archive.open(info))
        except (zipfile.BadZipFile, EOFError, zlib.error) as error:
            raise _reject(
                f"{archive_name}: member {relative!r} cannot be read ({error}); upload the archive again"
            ) from None


def _tar_members(archive: tarfile.TarFile, archive_name: str, budget: _ArchiveBudget, visit: MemberVisitor) -> None:
    """Check each tar member's name, type and size and call `visit` on regular files, in one pass.

    One pass matters for compressed tars: reading a member after iterating past it would
    decompress the stream again from its start.
    """
    seen: set[str] = set()
    while True:
        try:
            member = archive.next()
        except tarfile.TarError as error:
            raise _reject(f"{archive_name} is a damaged tar archive ({error}); rebuild it") from None
        except (EOFError, zlib.error, OSError) as error:
            raise _reject(
                f"{archive_name} is truncated or its compression is damaged ({error}); upload it again"
            ) from None
        if member is None:
            break
        budget.add_member()
        relative = _normalize_member_name(member.name, archive_name)
        if member.issym() or member.islnk():
            raise _reject(f"{archive_name} has a link {member.name!r}; links are not allowed, archive real files")
        if not (member.isfile() or member.isdir()):
            raise _reject(f"{archive_name} has a special file {member.name!r}; archive only regular files")
        if member.isdir() or not relative:
            continue
        if relative in seen:
            raise _reject(f"{archive_name} has the member {relative!r} twice; rebuild the archive")
        seen.add(relative)
        budget.add_bytes(member.size)
        budget.check_ratio()
        try:
            visit(relative, member.size, lambda member=member: archive.extractfile(member))
        except (tarfile.TarError, EOFError, zlib.error) as error:
            raise _reject(
                f"{archive_name}: member {relative!r} cannot be read ({error}); upload the archive again"
            ) from None


def _record_member(listing: _Listing, settings: Settings) -> MemberVisitor:
    """Return a visitor that records sizes, keeps small configs and validates safetensors headers."""

    def visit(relative: str, size: int, open_member: MemberOpener) -> None:
        if is_apple_metadata(relative):
            return
        listing.file_sizes[relative] = size
        if _is_small_file(relative, size):
            with open_member() as stream:
                listing.small_files[relative] = stream.read(MAX_SMALL_FILE_BYTES + 1)
        if relative.endswith(".safetensors"):
            with open_member() as stream:
                head = stream.read(300)
                _reject_non_safetensors(relative, _sniff(head) if size else "empty")
            with open_member() as stream:
                listing.headers[relative] = read_safetensors_header(
                    stream, size, relative, max_header_bytes=settings.max_safetensors_header_bytes
                )

    return visit


def _open_zip(path: Path, archive_name: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise _reject(f"{archive_name} is not a readable zip archive ({error}); upload it again") from None


def _open_tar(path: Path, archive_name: str) -> tarfile.TarFile:
    try:
        return tarfile.open(path, mode="r:*")
    except (tarfile.TarError, EOFError, OSError) as error:
        raise _reject(
            f"{archive_name} is not a readable tar archive ({error}); "
            "upload a .zip or .tar of the diffusers folder, or the .safetensors file itself"
        ) from None


def _walk_archive(path: Path, archive_name: str, kind: str, settings: Settings, visit: MemberVisitor) -> _ArchiveBudget:
    budget = _ArchiveBudget(archive_name, path.stat().st_size, settings)
    if kind == "zip":
        with _open_zip(path, archive_name) as archive:
            _zip_members(archive, archive_name, budget, visit)
    else:
        with _open_tar(path, archive_name) as archive:
            _tar_members(archive, archive_name, budget, visit)
    return budget


def _reject_torch_zip(paths: list[str], archive_name: str) -> None:
    """Reject the zip that torch.save writes: a `data.pkl` pickle plus raw tensor storages."""
    if MODEL_INDEX in paths or any(path.endswith(f"/{MODEL_INDEX}") for path in paths):
        return
    if any(path == "data.pkl" or path.endswith("/data.pkl") for path in paths):
        raise _reject_format(
            f"{archive_name} is a PyTorch pickle checkpoint (torch.save zip with data.pkl); {PICKLE_ADVICE}"
        )


# --- the public entry points ------------------------------------------------------------


def inspect_upload(path: Path, *, filename: str | None = None, settings: Settings | None = None) -> UploadInfo:
    """Detect the format of an uploaded checkpoint and check it is safe and complete to load.

    `filename` is the name the user gave (the upload may sit under a temporary name); the
    content decides the format. Raises UnsupportedFormatError for pickles and unknown
    formats and InputError for damaged or unsafe inputs, both with field "checkpoint".
    """
    settings = settings or get_settings()
    path = Path(path)
    filename = filename or path.name
    warnings: list[str] = []

    if path.is_symlink():
        raise _reject(f"{filename} is a symbolic link; links are never followed, upload the file itself")
    if path.is_dir():
        listing = _list_directory(path, settings)
        prefix = _diffusers_prefix(list(listing.file_sizes), f"the folder {filename}")
        if prefix:
            raise _reject(
                f"the folder {filename} has no {MODEL_INDEX}; "
                f"point at the pipeline folder {prefix.rstrip('/')!r} inside it"
            )
        return _check_diffusers_layout(listing, "", filename, "diffusers_dir", warnings)
    if not path.is_file():
        raise _reject(f"{filename} was not found or is not a regular file; check the path")

    size = path.stat().st_size
    if size == 0:
        raise _reject(f"{filename} is empty (0 bytes); upload the complete file again")
    if size > settings.max_upload_bytes:
        raise _reject(
            f"{filename} is {size} bytes, above the upload limit of {settings.max_upload_bytes} "
            "(SEALER_MAX_UPLOAD_BYTES)"
        )
    with path.open("rb") as stream:
        head = stream.read(300)
    kind = _sniff(head)
    logger.debug("upload %s: %d bytes, content looks like %s", filename, size, kind)

    if kind == "safetensors":
        if _has_pickle_suffix(filename):
            warnings.append(
                f"{filename} has a pickle file extension but its content is safetensors; it was read as safetensors, "
                "which runs no code"
            )
        return _inspect_safetensors(path, filename, size, settings, warnings)
    if kind in ARCHIVE_KINDS:
        listing = _Listing()
        _walk_archive(path, filename, kind, settings, _record_member(listing, settings))
        prefix = _diffusers_prefix(list(listing.file_sizes), filename)
        upload_format = "diffusers_zip" if kind == "zip" else "diffusers_tar"
        return _check_diffusers_layout(listing, prefix, filename, upload_format, warnings)
    if kind == "pickle" or _has_pickle_suffix(filename):
        raise _reject_format(f"{filename} is a pickle-based checkpoint; {PICKLE_ADVICE}")
    if filename.lower().endswith(".safetensors"):
        # Parsing names what is wrong with a damaged header better than "unknown format" would.
        return _inspect_safetensors(path, filename, size, settings, warnings)
    raise _reject_format(
        f"{filename} is not a format Sealer reads; upload a .safetensors file (single-file Stable Diffusion or a "
        "diffusers UNet) or a diffusers pipeline folder as .zip or .tar"
    )


def safe_extract(archive: Path, dest: Path, settings: Settings | None = None) -> Path:
    """Extract a checked zip or tar archive into `dest` and return the diffusers root inside it.

    Every member is checked before anything is written (names, types, counts, sizes,
    safetensors headers, the diffusers layout). Files are then written one by one under
    `dest` with their byte counts enforced, so an archive that lies about its sizes stops
    at the limit. `dest` must not exist or be empty, and is removed again on failure. The
    root is `dest` itself or its one top-level folder.
    """
    settings = settings or get_settings()
    archive = Path(archive)
    dest = Path(dest)
    info = inspect_upload(archive, settings=settings)
    if info.format not in ("diffusers_zip", "diffusers_tar"):
        raise _reject(f"{archive.name} is {info.format}, not an archive; only zip and tar archives are extracted")
    if dest.exists() and any(dest.iterdir()):
        raise ValueError(f"extraction folder {dest} is not empty; pass a new or empty folder")
    dest.mkdir(parents=True, exist_ok=True)

    written = _ArchiveBudget(archive.name, archive.stat().st_size, settings)
    kind = "zip" if info.format == "diffusers_zip" else "tar"
    try:
        _walk_archive(archive, archive.name, kind, settings, _write_member(dest.resolve(), written))
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise

    root = dest / info.root if info.root else dest
    logger.info("extracted %s: %d files, %d bytes into %s", archive.name, written.members, written.total_bytes, root)
    inspect_upload(root, filename=archive.name, settings=settings)
    return root


def _write_member(dest: Path, written: _ArchiveBudget) -> MemberVisitor:
    """Return a visitor that writes each member under `dest`, never more bytes than it declared."""

    def visit(relative: str, declared_size: int, open_member: MemberOpener) -> None:
        if is_apple_metadata(relative):
            return
        target = dest.joinpath(*relative.split("/"))
        if dest not in target.resolve().parents:
            raise _reject(f"{written.archive_name}: member {relative!r} would be written outside the extraction folder")
        written.add_member()

        size = 0
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open_member() as source, open(target, "xb") as sink:
                while chunk := source.read(COPY_CHUNK_BYTES):
                    size += len(chunk)
                    written.add_bytes(len(chunk))
                    if size > declared_size:
                        raise _reject(
                            f"{written.archive_name}: member {relative!r} is larger than its declared "
                            f"{declared_size} bytes; the archive is corrupt"
                        )
                    sink.write(chunk)
        except (FileExistsError, NotADirectoryError, IsADirectoryError):
            raise _reject(
                f"{written.archive_name}: member {relative!r} collides with a file or folder of the same name; "
                "rebuild the archive"
            ) from None
        if size != declared_size:
            raise _reject(
                f"{written.archive_name}: member {relative!r} has {size} bytes, not its declared {declared_size}; "
                "the archive is corrupt"
            )

    return visit
