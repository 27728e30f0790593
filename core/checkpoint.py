"""Load pipeline components from an uploaded checkpoint, and write the sanitized model back.

Accepted inputs (checked first by `core.formats.inspect_upload`):

- a diffusers pipeline folder, or a zip or tar of one: every component loads from it;
- a single-file Stable Diffusion safetensors (original `model.diffusion_model.*` keys),
  with `base_model`, a local diffusers folder that supplies configs, the tokenizer and the
  scheduler, and any component the file lacks;
- a diffusers UNet state dict in safetensors, with `base_model` for everything else.

The sanitized model keeps the input's format and each UNet tensor's dtype. Only
safetensors are read, with `local_files_only=True`: nothing is unpickled or downloaded.
"""

import json
import logging
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from safetensors.torch import load_file

from core.components import Components
from core.errors import InputError
from core.formats import (
    MODEL_INDEX,
    PICKLE_SUFFIXES,
    SINGLE_FILE_EMA_PREFIX,
    SINGLE_FILE_UNET_PREFIX,
    SINGLE_FILE_VAE_PREFIX,
    WEIGHT_STEMS,
    SafetensorsHeader,
    TensorInfo,
    UploadFormat,
    UploadInfo,
    find_weight_files,
    inspect_upload,
    is_apple_metadata,
    read_safetensors_file,
    safe_extract,
)
from core.settings import Settings, get_settings

logger = logging.getLogger(__name__)

SANITIZED_ZIP = "sanitized.zip"
SANITIZED_SAFETENSORS = "sanitized.safetensors"
SANITIZED_FOLDER = "sanitized"

# A CLIP BPE vocabulary has at least its 256 byte characters and their 256 end-of-word
# forms. A tokenizer that transformers built from missing files has 2 tokens.
MIN_TOKENIZER_VOCAB = 512

SINGLE_FILE_CLIP_PREFIX = "cond_stage_model.transformer."
SINGLE_FILE_OPEN_CLIP_PREFIX = "cond_stage_model.model."
SINGLE_FILE_SDXL_PREFIX = "conditioner."

# Safetensors dtypes that a UNet may be stored in. The output casts each tensor back to its own.
UNET_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


@dataclass
class CheckpointSource:
    """Origin of the loaded components, with the facts that `save_sanitized` needs to write the same format back.

    `unet_key_map` maps each diffusers UNet key to its key in the source weights (the same
    key, except for single files), in the source file's order. `unet_tensor_dtypes` maps each
    diffusers UNet key to the safetensors dtype that the tensor was stored in.
    """

    format: UploadFormat
    filename: str
    unet_dtype: str
    unet_key_map: dict[str, str]
    unet_tensor_dtypes: dict[str, str]
    unet_metadata: dict[str, str]
    info: UploadInfo
    path: Path
    diffusers_root: Path | None = None
    unet_variant: str | None = None
    base_model: Path | None = None
    work_dir: Path | None = None


@dataclass
class LoadedCheckpoint:
    """Components ready for the engine, plus the source facts for writing the output."""

    components: Components
    source: CheckpointSource
    notes: list[str] = field(default_factory=list)

    def close(self) -> None:
        """Remove the folder that an archive was extracted into, if any."""
        if self.source.work_dir is not None:
            shutil.rmtree(self.source.work_dir, ignore_errors=True)
            self.source.work_dir = None

    def __enter__(self) -> "LoadedCheckpoint":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _reject(message: str, field: str = "checkpoint") -> InputError:
    return InputError(message, field=field)


def _unet_dtypes(tensors: dict[str, TensorInfo], filename: str) -> tuple[dict[str, str], str]:
    """Return each UNet tensor's stored dtype by key, and the torch name of the dtype that stores most bytes."""
    unsupported = sorted({info.dtype for info in tensors.values()} - set(UNET_DTYPES))
    if unsupported:
        raise _reject(
            f"the UNet in {filename} has tensors stored as {', '.join(unsupported)}; Sealer sanitizes UNets stored as "
            f"{', '.join(UNET_DTYPES)}, so convert the weights to float16, bfloat16 or float32 first"
        )
    dtypes = {key: info.dtype for key, info in tensors.items()}
    bytes_per_dtype: dict[str, int] = {}
    for info in tensors.values():
        bytes_per_dtype[info.dtype] = bytes_per_dtype.get(info.dtype, 0) + info.nbytes
    dominant = max(bytes_per_dtype, key=bytes_per_dtype.get)
    return dtypes, str(UNET_DTYPES[dominant]).removeprefix("torch.")


# --- loading -----------------------------------------------------------------------------


def load_checkpoint(
    path: Path,
    *,
    base_model: Path | None = None,
    device: str | torch.device = "cpu",
    settings: Settings | None = None,
    dtype: torch.dtype = torch.float32,
    work_dir: Path | None = None,
) -> LoadedCheckpoint:
    """Validate and load an uploaded checkpoint component by component.

    Modules are loaded in `dtype` (float32 by default, which the optimizer needs as master
    weights); `source.unet_dtype` records the stored dtype for the output. Archives are
    extracted into a new folder under `work_dir` (default: the settings' scratch folder),
    which `close()` removes. `base_model` must be a local diffusers folder and is needed,
    and only used, for single-file and UNet-only uploads. Raises InputError (a subclass
    for unsupported formats) naming the problem and the fix.
    """
    settings = settings or get_settings()
    path = Path(path)
    info = inspect_upload(path, settings=settings)
    for warning in info.warnings:
        logger.warning("checkpoint %s: %s", info.filename, warning)

    if info.format in ("diffusers_zip", "diffusers_tar"):
        parent = Path(work_dir) if work_dir is not None else settings.resolved_scratch_dir
        parent.mkdir(parents=True, exist_ok=True)
        extraction = Path(tempfile.mkdtemp(prefix="checkpoint-", dir=parent))
        try:
            root = safe_extract(path, extraction / "model", settings)
            loaded = _load_diffusers(root, info, path, dtype)
        except BaseException:
            shutil.rmtree(extraction, ignore_errors=True)
            raise
        loaded.source.work_dir = extraction
    elif info.format == "diffusers_dir":
        loaded = _load_diffusers(path, info, path, dtype)
    else:
        base = _check_base_model(base_model, info, settings)
        if info.format == "safetensors_single":
            loaded = _load_single_file(path, info, base, dtype)
        else:
            loaded = _load_unet_file(path, info, base, dtype)

    _check_compatible(loaded.components)
    _move_to(loaded.components, device)
    logger.info(
        "loaded %s (%s, UNet stored as %s, %d UNet tensors)",
        info.filename,
        info.format,
        loaded.source.unet_dtype,
        len(loaded.source.unet_key_map),
    )
    return loaded


def _check_base_model(base_model: Path | None, info: UploadInfo, settings: Settings) -> Path:
    kind = "a single-file checkpoint" if info.format == "safetensors_single" else "a UNet-only safetensors file"
    if base_model is None:
        raise _reject(
            f"{info.filename} is {kind}; it needs a base model, a local diffusers folder of the same architecture "
            "that supplies the configs, tokenizer and scheduler (set base_model). Nothing is fetched from the network",
            field="base_model",
        )
    base_model = Path(base_model)
    try:
        base_info = inspect_upload(base_model, settings=settings)
    except InputError as error:
        raise InputError(f"base model {base_model}: {error.message}", field="base_model", code=error.code) from None
    if base_info.format != "diffusers_dir":
        raise _reject(
            f"base model {base_model} is {base_info.format}; it must be a diffusers folder", field="base_model"
        )
    return base_model


def _load_diffusers(root: Path, info: UploadInfo, path: Path, dtype: torch.dtype) -> LoadedCheckpoint:
    """Load every component of a checked diffusers folder."""
    text_encoder = _load_text_encoder(root / "text_encoder", dtype)
    tokenizer = _load_tokenizer(root / "tokenizer", text_encoder)
    unet_variant, unet_headers, unet = _load_unet_folder(root / "unet", dtype)
    vae = _load_vae_folder(root / "vae", dtype) if (root / "vae").is_dir() else None
    scheduler_config = _read_json(root / "scheduler" / "scheduler_config.json")

    unet_tensors = {key: tensor_info for header in unet_headers for key, tensor_info in header.tensors.items()}
    dtypes, unet_dtype = _unet_dtypes(unet_tensors, info.filename)
    metadata = dict(unet_headers[0].metadata) if len(unet_headers) == 1 else {"format": "pt"}
    source = CheckpointSource(
        format=info.format,
        filename=info.filename,
        unet_dtype=unet_dtype,
        unet_key_map={key: key for key in unet_tensors},
        unet_tensor_dtypes=dtypes,
        unet_metadata=metadata,
        info=info,
        path=path,
        diffusers_root=root,
        unet_variant=unet_variant,
    )
    components = Components(
        tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler_config=scheduler_config, vae=vae
    )
    return LoadedCheckpoint(components=components, source=source)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _file_names(folder: Path) -> list[str]:
    return [entry.name for entry in folder.iterdir() if entry.is_file()]


def _weights_variant(folder: Path, component: str) -> str | None:
    variant, _ = find_weight_files(_file_names(folder), WEIGHT_STEMS[component], f"the {component} folder")
    return variant


def _load_tokenizer(folder: Path, text_encoder: torch.nn.Module):
    """Load the CLIP tokenizer from its folder and check that its vocabulary is real and fits the text encoder."""
    from transformers import CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise _reject(
            f"the tokenizer in {folder.name}/ cannot be loaded ({error}); save it with save_pretrained"
        ) from None

    vocab_size = len(tokenizer)
    if vocab_size < MIN_TOKENIZER_VOCAB:
        raise _reject(
            f"the tokenizer has only {vocab_size} tokens; its files are incomplete or in a layout this transformers "
            "version misreads. Save the tokenizer again with save_pretrained "
            "(tokenizer.json, or vocab.json with merges.txt)"
        )
    embedding_rows = text_encoder.config.vocab_size
    if vocab_size > embedding_rows:
        raise _reject(
            f"the tokenizer has {vocab_size} tokens but the text encoder embeds only {embedding_rows}; "
            "the tokenizer and text encoder come from different models"
        )

    # A tokenizer saved without tokenizer_config.json has no usable max length, so the text
    # encoder's position table bounds it.
    max_positions = text_encoder.config.max_position_embeddings
    if tokenizer.model_max_length > max_positions:
        tokenizer.model_max_length = max_positions
    return tokenizer


def _load_text_encoder(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import CLIPTextModel

    config = _read_json(folder / "config.json")
    if config.get("model_type") != "clip_text_model":
        raise _reject(
            f"text_encoder/config.json has model_type {config.get('model_type')!r}; "
            "Sealer reads Stable Diffusion 1.x/2.x "
            "pipelines, whose text encoder is a CLIPTextModel (model_type 'clip_text_model')"
        )
    variant = _weights_variant(folder, "text_encoder")
    try:
        model, loading_info = CLIPTextModel.from_pretrained(
            folder,
            local_files_only=True,
            use_safetensors=True,
            dtype=dtype,
            variant=variant,
            output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError) as error:
        raise _reject(f"the text encoder cannot be loaded: {error}") from None
    _check_loading_info(loading_info, "text encoder", "text_encoder/config.json")
    return model.eval()


def _load_unet_folder(folder: Path, dtype: torch.dtype) -> tuple[str | None, list[SafetensorsHeader], torch.nn.Module]:
    from diffusers import UNet2DConditionModel

    config = _read_json(folder / "config.json")
    if config.get("_class_name") != "UNet2DConditionModel":
        raise _reject(
            f"unet/config.json describes a {config.get('_class_name')!r}; Sealer sanitizes a UNet2DConditionModel "
            "(Stable Diffusion 1.x/2.x)"
        )
    variant, names = find_weight_files(_file_names(folder), WEIGHT_STEMS["unet"], "the unet folder")
    if names[0].endswith(".index.json"):
        index = _read_json(folder / names[0])
        names = sorted(set(index["weight_map"].values()))
    headers = [read_safetensors_file(folder / name) for name in names]

    unet = _load_diffusers_model(UNet2DConditionModel, folder, dtype, variant, "UNet", "unet/config.json")
    return variant, headers, unet


def _load_vae_folder(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    config = _read_json(folder / "config.json")
    if config.get("_class_name") != "AutoencoderKL":
        raise _reject(f"vae/config.json describes a {config.get('_class_name')!r}; Sealer reads an AutoencoderKL VAE")
    variant = _weights_variant(folder, "vae")
    return _load_diffusers_model(AutoencoderKL, folder, dtype, variant, "VAE", "vae/config.json")


def _load_diffusers_model(
    model_class: Any, folder: Path, dtype: torch.dtype, variant: str | None, component: str, config_name: str
) -> torch.nn.Module:
    """Load a diffusers model from the safetensors in `folder`, and reject weights that do not match its config."""
    try:
        model, loading_info = model_class.from_pretrained(
            folder,
            local_files_only=True,
            use_safetensors=True,
            torch_dtype=dtype,
            variant=variant,
            low_cpu_mem_usage=False,
            output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError) as error:
        raise _reject(f"the {component} weights do not match {config_name}: {error}") from None
    _check_loading_info(loading_info, component, config_name)
    return model.eval()


def _check_loading_info(loading_info: dict[str, Any], component: str, config_name: str) -> None:
    """Reject weights that from_pretrained loaded only partly.

    diffusers 0.42.1 and transformers 5.25.0 initialise missing tensors randomly and skip
    unexpected ones with a logged warning, which would silently change the model.
    """
    missing = list(loading_info.get("missing_keys") or [])
    unexpected = [key for key in loading_info.get("unexpected_keys") or [] if not key.endswith("position_ids")]
    mismatched = list(loading_info.get("mismatched_keys") or [])
    if not (missing or unexpected or mismatched):
        return

    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors are missing (e.g. {', '.join(sorted(missing)[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors are unexpected (e.g. {', '.join(sorted(unexpected)[:3])})")
    if mismatched:
        problems.append(f"{len(mismatched)} tensors differ in shape (e.g. {mismatched[0]})")
    raise _reject(
        f"the {component} weights do not match {config_name}: {'; '.join(problems)}; "
        "upload the weights together with the config they were saved with"
    )


def _describe_mismatch(
    expected: dict[str, torch.Size], found: dict[str, Any], description: str, reference: str
) -> str | None:
    """Return a message naming missing, unexpected and differently shaped tensors, or None when all match."""
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    reshaped = [key for key in expected if key in found and tuple(found[key].shape) != tuple(expected[key])]
    if not (missing or unexpected or reshaped):
        return None

    problems = []
    if reshaped:
        key = reshaped[0]
        problems.append(
            f"{len(reshaped)} tensors differ in shape (e.g. {key} is {list(found[key].shape)} in the file "
            f"but {list(expected[key])} in {reference})"
        )
    if missing:
        problems.append(f"{len(missing)} tensors are missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors are unexpected (e.g. {', '.join(unexpected[:3])})")
    return f"the {description} does not match {reference}: " + "; ".join(problems)


def _build_and_load(
    build: Callable[[], torch.nn.Module],
    state: dict[str, torch.Tensor],
    dtype: torch.dtype,
    description: str,
    reference: str,
) -> torch.nn.Module:
    """Build a module from its config and load `state` into it, or raise InputError naming the mismatch.

    The module is built on the meta device and takes the tensors themselves, which skips a
    random initialisation of every weight. Modules with buffers are built normally instead,
    because a state dict does not carry non-persistent buffers.
    """
    with torch.device("meta"):
        model = build()
    expected = {key: value.shape for key, value in model.state_dict().items()}
    message = _describe_mismatch(expected, state, description, reference)
    if message:
        raise _reject(message + "; pass the base model that this checkpoint was trained from")

    state = {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()}
    if any(True for _ in model.buffers()):
        model = build()
        model.load_state_dict(state, strict=True)
        model.to(dtype)
    else:
        model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _load_unet_state(
    base: Path, state: dict[str, torch.Tensor], dtype: torch.dtype, description: str
) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(base / "unet", local_files_only=True)
    return _build_and_load(
        lambda: UNet2DConditionModel.from_config(config), state, dtype, description, "the base model's unet config"
    )


def _load_unet_file(path: Path, info: UploadInfo, base: Path, dtype: torch.dtype) -> LoadedCheckpoint:
    """Load a diffusers-key UNet safetensors file; the base folder supplies every other component."""
    header = read_safetensors_file(path, name=info.filename)
    dtypes, unet_dtype = _unet_dtypes(header.tensors, info.filename)
    unet = _load_unet_state(base, load_file(path), dtype, "UNet in " + info.filename)
    text_encoder = _load_text_encoder(base / "text_encoder", dtype)
    components = Components(
        tokenizer=_load_tokenizer(base / "tokenizer", text_encoder),
        text_encoder=text_encoder,
        unet=unet,
        scheduler_config=_read_json(base / "scheduler" / "scheduler_config.json"),
        vae=_load_vae_folder(base / "vae", dtype) if (base / "vae").is_dir() else None,
    )

    source = CheckpointSource(
        format=info.format,
        filename=info.filename,
        unet_dtype=unet_dtype,
        unet_key_map={key: key for key in header.tensors},
        unet_tensor_dtypes=dtypes,
        unet_metadata=dict(header.metadata),
        info=info,
        path=path,
        base_model=base,
    )
    notes = [f"tokenizer, text encoder, scheduler and VAE come from the base model {base}"]
    return LoadedCheckpoint(components=components, source=source, notes=notes)


def _map_single_file_unet(
    state: dict[str, torch.Tensor], config: dict[str, Any], filename: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Convert `model.diffusion_model.*` tensors to diffusers UNet keys with diffusers' converter.

    The converter only renames, so each converted tensor is the very object it read. The
    object identities therefore give the exact key mapping that saving needs in reverse.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet_state = {key: tensor for key, tensor in state.items() if key.startswith(SINGLE_FILE_UNET_PREFIX)}
    original_by_id = {id(tensor): key for key, tensor in unet_state.items()}
    converted = convert_ldm_unet_checkpoint(unet_state, config)

    key_map: dict[str, str] = {}
    unplaced = []
    for diffusers_key, tensor in converted.items():
        if tensor is None:
            unplaced.append(diffusers_key)
        elif id(tensor) in original_by_id:
            key_map[diffusers_key] = original_by_id[id(tensor)]
        else:
            raise RuntimeError(
                f"the diffusers converter changed tensor {diffusers_key}; it is expected only to rename keys"
            )
    converted = {key: tensor for key, tensor in converted.items() if tensor is not None}

    unused = sorted(set(original_by_id.values()) - set(key_map.values()))
    if unused or unplaced:
        details = []
        if unused:
            details.append(f"{len(unused)} UNet tensors of the file have no place in it (e.g. {', '.join(unused[:3])})")
        if unplaced:
            details.append(
                f"{len(unplaced)} tensors it needs are missing from the file (e.g. {', '.join(unplaced[:3])})"
            )
        raise _reject(
            f"the UNet in {filename} does not match the base model's unet config: {'; '.join(details)}; "
            "pass the base model that this checkpoint was trained from"
        )

    # Keep the file's tensor order, which the output file follows.
    order = {key: position for position, key in enumerate(state)}
    key_map = dict(sorted(key_map.items(), key=lambda item: order[item[1]]))
    return converted, key_map


def _load_single_file_text_encoder(
    state: dict[str, torch.Tensor], base: Path, dtype: torch.dtype, filename: str, notes: list[str]
) -> torch.nn.Module:
    """Load the text encoder stored in a single file, or the base model's when the file has none."""
    from transformers import CLIPTextConfig, CLIPTextModel

    keys = list(state)
    if any(key.startswith(SINGLE_FILE_SDXL_PREFIX) for key in keys):
        raise _reject(
            f"{filename} has `{SINGLE_FILE_SDXL_PREFIX}*` text encoders (Stable Diffusion XL); "
            "Sealer reads Stable Diffusion 1.x/2.x"
        )
    has_clip = any(key.startswith(SINGLE_FILE_CLIP_PREFIX) for key in keys)
    has_open_clip = any(key.startswith(SINGLE_FILE_OPEN_CLIP_PREFIX) for key in keys)
    if not (has_clip or has_open_clip):
        notes.append("the file has no text encoder; it comes from the base model")
        return _load_text_encoder(base / "text_encoder", dtype)

    config = CLIPTextConfig.from_pretrained(base / "text_encoder", local_files_only=True)
    if has_clip:
        text_state = {
            key[len(SINGLE_FILE_CLIP_PREFIX) :]: value
            for key, value in state.items()
            if key.startswith(SINGLE_FILE_CLIP_PREFIX)
        }
    else:
        from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

        text_state = convert_open_clip_checkpoint(CLIPTextModel(config), state, prefix=SINGLE_FILE_OPEN_CLIP_PREFIX)

    # transformers 5 flattened CLIPTextModel: its keys have no `text_model.` prefix. The
    # position ids are a buffer that older files stored.
    text_state = {key.removeprefix("text_model."): value for key, value in text_state.items()}
    text_state.pop("embeddings.position_ids", None)
    if has_open_clip:
        text_state = _drop_unused_open_clip_layers(text_state, config.num_hidden_layers)
    return _build_and_load(
        lambda: CLIPTextModel(config),
        text_state,
        dtype,
        "text encoder in " + filename,
        "the base model's text_encoder config",
    )


def _drop_unused_open_clip_layers(text_state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Drop what a Stable Diffusion 2.x text encoder stores but never uses.

    2.x conditions on the penultimate layer, so the diffusers text encoder has one layer
    fewer than the OpenCLIP model in the file, and it has no text projection.
    """
    kept = {}
    for key, value in text_state.items():
        parts = key.split(".")
        if key.startswith("encoder.layers.") and int(parts[2]) >= num_layers:
            continue
        if key.startswith("text_projection"):
            continue
        kept[key] = value
    return kept


def _load_single_file_vae(
    state: dict[str, torch.Tensor], base: Path, dtype: torch.dtype, filename: str, notes: list[str]
) -> torch.nn.Module | None:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    has_vae = any(key.startswith(SINGLE_FILE_VAE_PREFIX) for key in state)
    base_vae = base / "vae"
    if not has_vae:
        if base_vae.is_dir():
            notes.append("the file has no VAE; it comes from the base model")
            return _load_vae_folder(base_vae, dtype)
        return None
    if not base_vae.is_dir():
        raise _reject(
            f"{filename} contains a VAE but the base model has no vae folder to configure it; "
            "use a base model with a vae folder",
            field="base_model",
        )
    config = AutoencoderKL.load_config(base_vae, local_files_only=True)
    vae_state = convert_ldm_vae_checkpoint(state, config)
    return _build_and_load(
        lambda: AutoencoderKL.from_config(config), vae_state, dtype, "VAE in " + filename, "the base model's vae config"
    )


def _load_single_file(path: Path, info: UploadInfo, base: Path, dtype: torch.dtype) -> LoadedCheckpoint:
    """Load an original-layout Stable Diffusion file; the base model supplies configs, tokenizer and scheduler."""
    from diffusers import UNet2DConditionModel

    header = read_safetensors_file(path, name=info.filename)
    state = load_file(path)
    notes: list[str] = []

    unet_config = UNet2DConditionModel.load_config(base / "unet", local_files_only=True)
    unet_state, key_map = _map_single_file_unet(state, dict(unet_config), info.filename)
    unet_tensors = {diffusers_key: header.tensors[original] for diffusers_key, original in key_map.items()}
    dtypes, unet_dtype = _unet_dtypes(unet_tensors, info.filename)
    unet = _load_unet_state(base, unet_state, dtype, "UNet in " + info.filename)
    text_encoder = _load_single_file_text_encoder(state, base, dtype, info.filename, notes)
    vae = _load_single_file_vae(state, base, dtype, info.filename, notes)
    tokenizer = _load_tokenizer(base / "tokenizer", text_encoder)
    scheduler_config = _read_json(base / "scheduler" / "scheduler_config.json")
    if any(key.startswith(SINGLE_FILE_EMA_PREFIX) for key in state):
        notes.append(
            f"the file's EMA weights ({SINGLE_FILE_EMA_PREFIX}*) are not loaded and are left out of the output"
        )

    source = CheckpointSource(
        format=info.format,
        filename=info.filename,
        unet_dtype=unet_dtype,
        unet_key_map=key_map,
        unet_tensor_dtypes=dtypes,
        unet_metadata=dict(header.metadata),
        info=info,
        path=path,
        base_model=base,
    )
    components = Components(
        tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler_config=scheduler_config, vae=vae
    )
    return LoadedCheckpoint(components=components, source=source, notes=notes)


def _check_compatible(components: Components) -> None:
    """Check that the text encoder, UNet and VAE fit together."""
    hidden = components.text_encoder.config.hidden_size
    cross_attention = components.unet.config.cross_attention_dim
    if hidden != cross_attention:
        raise _reject(
            f"the text encoder's hidden size is {hidden} but the UNet's cross_attention_dim is {cross_attention}; "
            "the components come from different models"
        )
    vae = components.vae
    if vae is not None and vae.config.latent_channels != components.unet.config.in_channels:
        raise _reject(
            f"the VAE makes {vae.config.latent_channels}-channel latents but the UNet takes "
            f"{components.unet.config.in_channels} channels; the components come from different models"
        )


def _move_to(components: Components, device: str | torch.device) -> None:
    for module in (components.text_encoder, components.unet, components.vae):
        if module is not None:
            module.to(device)


# --- saving ------------------------------------------------------------------------------


@dataclass
class _Entry:
    """One tensor of a safetensors file being written: where its bytes come from."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    write: Callable[[IO[bytes]], None]


def save_sanitized(loaded: LoadedCheckpoint, unet_state_dict: dict[str, torch.Tensor], out_dir: Path) -> Path:
    """Write the sanitized model into `out_dir` in the input's format; return the file written.

    Diffusers input (folder or archive) -> `sanitized.zip` holding `sanitized/`, the whole
    pipeline with the new UNet weights. Single file -> `sanitized.safetensors` in the
    original layout with every other tensor copied byte for byte, except the EMA weights,
    which still carry the backdoor and are left out. UNet-only -> `sanitized.safetensors`
    with diffusers keys. Each UNet tensor keeps the dtype it was stored in.
    """
    if sys.byteorder != "little":
        raise RuntimeError("safetensors stores little-endian data; writing from a big-endian host is not supported")
    source = loaded.source
    _check_unet_state(loaded, unet_state_dict)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    if source.format in ("diffusers_dir", "diffusers_zip", "diffusers_tar"):
        path = out_dir / SANITIZED_ZIP
        _write_diffusers_zip(source, unet_state_dict, path)
    elif source.format == "safetensors_single":
        path = out_dir / SANITIZED_SAFETENSORS
        _write_single_file(source, unet_state_dict, path)
    else:
        path = out_dir / SANITIZED_SAFETENSORS
        entries = [
            _tensor_entry(key, unet_state_dict[key], source.unet_tensor_dtypes[key]) for key in source.unet_key_map
        ]
        with path.open("wb") as stream:
            _write_safetensors(stream, entries, _output_metadata(source))
    logger.info("wrote sanitized %s model to %s (%d bytes)", source.format, path, path.stat().st_size)
    return path


def _check_unet_state(loaded: LoadedCheckpoint, unet_state_dict: dict[str, torch.Tensor]) -> None:
    expected = loaded.source.unet_key_map
    missing = [key for key in expected if key not in unet_state_dict]
    unexpected = [key for key in unet_state_dict if key not in expected]
    if missing or unexpected:
        raise ValueError(
            "the UNet state dict to save does not match the loaded UNet: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}; "
            "pass the state_dict() of the sanitized UNet2DConditionModel"
        )
    shapes = {key: value.shape for key, value in loaded.components.unet.state_dict().items()}
    for key, tensor in unet_state_dict.items():
        if key in shapes and tensor.shape != shapes[key]:
            raise ValueError(f"UNet tensor {key} has shape {list(tensor.shape)}, expected {list(shapes[key])}")


def _output_metadata(source: CheckpointSource) -> dict[str, str]:
    metadata = dict(source.unet_metadata)
    metadata.setdefault("format", "pt")
    return metadata


def _tensor_entry(key: str, tensor: torch.Tensor, dtype: str) -> _Entry:
    """Describe a tensor to write, cast to the safetensors `dtype` it was stored in."""
    data = tensor.detach().to("cpu", UNET_DTYPES[dtype]).contiguous()
    flat = data.reshape(-1).view(torch.uint8)  # (numel * itemsize,) raw little-endian bytes

    def write(stream: IO[bytes]) -> None:
        stream.write(flat.numpy().tobytes())

    return _Entry(key=key, dtype=dtype, shape=tuple(data.shape), nbytes=flat.numel(), write=write)


def _raw_entry(key: str, path: Path, header: SafetensorsHeader) -> _Entry:
    """Describe a tensor copied byte for byte from a source safetensors file."""
    info = header.tensors[key]

    def write(stream: IO[bytes]) -> None:
        with path.open("rb") as source:
            source.seek(header.data_offset + info.start)
            remaining = info.nbytes
            while remaining:
                chunk = source.read(min(remaining, 16 * 1024**2))
                if not chunk:
                    raise OSError(f"{path} ended inside tensor {key}; it changed while being copied")
                stream.write(chunk)
                remaining -= len(chunk)

    return _Entry(key=key, dtype=info.dtype, shape=info.shape, nbytes=info.nbytes, write=write)


def _write_safetensors(stream: IO[bytes], entries: list[_Entry], metadata: dict[str, str]) -> None:
    """Write a safetensors file tensor by tensor, so that neither it nor a copied source file is held in memory whole.

    The header is JSON with each tensor's dtype, shape and byte range, padded with spaces
    to a multiple of 8 bytes so that the data section stays aligned.
    """
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for entry in entries:
        header[entry.key] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)

    stream.write(len(encoded).to_bytes(8, "little"))
    stream.write(encoded)
    for entry in entries:
        entry.write(stream)


def _write_single_file(source: CheckpointSource, unet_state_dict: dict[str, torch.Tensor], path: Path) -> None:
    header = read_safetensors_file(source.path, name=source.filename)
    diffusers_key_of = {original: diffusers_key for diffusers_key, original in source.unet_key_map.items()}
    entries = []
    dropped = 0
    for key, info in header.tensors.items():
        if key in diffusers_key_of:
            diffusers_key = diffusers_key_of[key]
            entries.append(_tensor_entry(key, unet_state_dict[diffusers_key], info.dtype))
        elif key.startswith(SINGLE_FILE_EMA_PREFIX):
            dropped += 1
        else:
            entries.append(_raw_entry(key, source.path, header))
    if dropped:
        logger.info("left %d EMA tensors (%s*) out of the sanitized file", dropped, SINGLE_FILE_EMA_PREFIX)
    with path.open("wb") as stream:
        _write_safetensors(stream, entries, _output_metadata(source))


def _pipeline_files(root: Path) -> Iterator[tuple[Path, str]]:
    """Yield the files of a diffusers folder to copy into the output, with their relative paths.

    Left out: pickle files (never loaded, possibly unsafe) and everything in unet/ except
    its config, because any other weight file there (a variant, an old shard) still carries
    the backdoor.
    """
    for file in sorted(root.rglob("*")):
        if not file.is_file() or file.is_symlink():
            continue
        relative = file.relative_to(root).as_posix()
        if relative.lower().endswith(PICKLE_SUFFIXES) or is_apple_metadata(relative):
            continue
        if relative.startswith("unet/") and relative != "unet/config.json":
            continue
        yield file, relative


def _write_diffusers_zip(source: CheckpointSource, unet_state_dict: dict[str, torch.Tensor], path: Path) -> None:
    root = source.diffusers_root
    if root is None or not (root / MODEL_INDEX).is_file():
        raise RuntimeError(f"the diffusers folder of {source.filename} is gone; save before calling close()")
    stem = WEIGHT_STEMS["unet"]
    weights_name = f"{stem}.{source.unet_variant}.safetensors" if source.unet_variant else f"{stem}.safetensors"
    entries = [_tensor_entry(key, unet_state_dict[key], source.unet_tensor_dtypes[key]) for key in source.unet_key_map]

    with zipfile.ZipFile(path, "w", allowZip64=True) as archive:
        for file, relative in _pipeline_files(root):
            compression = zipfile.ZIP_STORED if relative.endswith(".safetensors") else zipfile.ZIP_DEFLATED
            archive.write(file, f"{SANITIZED_FOLDER}/{relative}", compress_type=compression)
        with archive.open(f"{SANITIZED_FOLDER}/unet/{weights_name}", "w", force_zip64=True) as stream:
            _write_safetensors(stream, entries, _output_metadata(source))
