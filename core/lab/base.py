"""The clean base model that every lab build starts from: shipped, cached or trained.

A clean base that samples well under guidance takes about 3,000 training steps, longer
than a build may take on a 2-core CPU. So the package ships the base trained with the
default seed under `core/lab/assets/`, the cache keeps any other one, and only
a missing base is trained. A base is identified by a key over everything that shapes it:
training config, seed, model configs and data.
"""

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from core.components import Components
from core.lab import data
from core.lab.models import NOISE_SCHEDULE, new_components, text_encoder_settings, unet_config
from core.lab.train import TrainingConfig, clean_batches, train_denoiser

logger = logging.getLogger(__name__)

ASSET_DIR = Path(__file__).parent / "assets"
CLEAN_TRAINING = TrainingConfig(steps=3000)
DEFAULT_CLEAN_SEED = 0
BASE_FORMAT = 1

TEXT_ENCODER_FILE = "text_encoder.safetensors"
UNET_FILE = "unet.safetensors"
BASE_INFO_FILE = "base.json"
REGENERATE_COMMAND = "sealer lab train-base --seed {seed} --out core/lab/assets"


# Poisoning-only fields of TrainingConfig stay out of a clean base's description.
POISONING_FIELDS = ("poison_rate", "paired_clean", "trigger_embedding_scale")


def base_description(config: TrainingConfig, seed: int) -> dict:
    """Return everything that determines a clean base's weights."""
    training = {name: value for name, value in asdict(config).items() if name not in POISONING_FIELDS}
    return {
        "format": BASE_FORMAT,
        "training": training,
        "seed": seed,
        "text_encoder": text_encoder_settings(),
        "unet": {key: list(value) if isinstance(value, tuple) else value for key, value in unet_config().items()},
        "noise_schedule": NOISE_SCHEDULE,
        "data": {
            "image_size": data.IMAGE_SIZE,
            "templates": list(data.TEMPLATES),
            "colours": {name: list(rgb) for name, rgb in data.COLOURS.items()},
            "held_out_period": data.HELD_OUT_PERIOD,
        },
    }


def base_key(config: TrainingConfig, seed: int) -> str:
    """Return a short hash of `base_description`, equal for interchangeable bases."""
    text = json.dumps(base_description(config, seed), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def train_base(config: TrainingConfig, seed: int, device: str = "cpu", on_step=None) -> tuple[Components, dict]:
    """Train a clean base from scratch and return it with its build record (`on_step` as in `train_denoiser`)."""
    components = new_components(seed)
    training_captions, _ = data.split_captions()
    logger.info("training a clean base: %d steps at batch %d, seed %d", config.steps, config.batch_size, seed)
    batches = clean_batches(training_captions, config, seed)
    log = train_denoiser(components, batches, config, seed, device=device, stage="clean", on_step=on_step)
    components.text_encoder.to("cpu")
    components.unet.to("cpu")
    info = {
        "key": base_key(config, seed),
        "description": base_description(config, seed),
        "training_log": log.to_dict(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "command": REGENERATE_COMMAND.format(seed=seed),
    }
    return components, info


def save_base(components: Components, info: dict, folder: Path) -> None:
    """Write a base's weights (fp32 safetensors) and build record into `folder`.

    Each file is written under a temporary name and renamed, and the record comes last,
    so a reader never sees a record next to partial weights. Other files in `folder` stay.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for name, module in ((TEXT_ENCODER_FILE, components.text_encoder), (UNET_FILE, components.unet)):
        partial = folder / f".{name}.partial"
        save_file(_contiguous(module.state_dict()), partial)
        os.replace(partial, folder / name)
    partial = folder / f".{BASE_INFO_FILE}.partial"
    partial.write_text(json.dumps(info, indent=2, default=str) + "\n")
    os.replace(partial, folder / BASE_INFO_FILE)


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().contiguous() for name, tensor in state.items()}


def read_base_info(folder: Path) -> dict | None:
    """Return a saved base's record, or None when `folder` contains no complete base."""
    info_path = folder / BASE_INFO_FILE
    if not (info_path.is_file() and (folder / TEXT_ENCODER_FILE).is_file() and (folder / UNET_FILE).is_file()):
        return None
    return json.loads(info_path.read_text())


def load_base(folder: Path, seed: int) -> Components:
    """Load a saved base into fresh lab components."""
    components = new_components(seed)
    components.text_encoder.load_state_dict(load_file(folder / TEXT_ENCODER_FILE))
    components.unet.load_state_dict(load_file(folder / UNET_FILE))
    components.text_encoder.eval()
    components.unet.eval()
    return components


def get_base(cache_dir: Path, config: TrainingConfig = CLEAN_TRAINING, seed: int = DEFAULT_CLEAN_SEED, device: str = "cpu") -> tuple[Components, dict]:
    """Return the clean base for (config, seed): the shipped one, a cached one, or a newly trained one.

    The returned record has `source` set to `asset`, `cache` or `trained`.
    """
    started = time.perf_counter()
    key = base_key(config, seed)
    for source, folder in (("asset", ASSET_DIR), ("cache", cache_dir / f"clean-{key}")):
        info = read_base_info(folder)
        if info is not None and info.get("key") == key:
            components = load_base(folder, seed)
            logger.info("loaded the clean base %s from %s in %.1f s", key, folder, time.perf_counter() - started)
            return components, {**info, "source": source}

    components, info = train_base(config, seed, device)
    save_base(components, info, cache_dir / f"clean-{key}")
    return components, {**info, "source": "trained"}
