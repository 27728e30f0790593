"""The lab's small Stable-Diffusion-architecture pipeline: configs, saving and loading.

The pipeline has SD's parts without the VAE: a CLIP text encoder over the real CLIP BPE
vocabulary and a `UNet2DConditionModel` that denoises 16x16 RGB images directly (pixel
space), trained with a DDPM schedule and sampled with DDIM.
"""

import json
import logging
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from core.components import Components
from core.lab.data import IMAGE_SIZE
from core.tokenizer import CLIP_VOCAB_SIZE, load_clip_tokenizer

logger = logging.getLogger(__name__)

MAX_LENGTH = 77
HIDDEN_SIZE = 64
NUM_TRAIN_TIMESTEPS = 1000


def text_encoder_settings() -> dict:
    """CLIP text encoder: hidden 64, 2 layers, 4 heads, FFN 256, the full 49,408-token vocabulary."""
    # The special tokens are the last two ids of the CLIP vocabulary.
    bos_token_id, eos_token_id = CLIP_VOCAB_SIZE - 2, CLIP_VOCAB_SIZE - 1
    return {
        "vocab_size": CLIP_VOCAB_SIZE,
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_LENGTH,
        "projection_dim": HIDDEN_SIZE,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": eos_token_id,
    }


def text_encoder_config() -> CLIPTextConfig:
    return CLIPTextConfig(**text_encoder_settings())


def unet_config() -> dict:
    """Pixel-space 16x16 UNet, blocks (32, 64, 64), cross-attention only at 8x8, 4x4 and mid.

    Seven cross-attention modules in all. Attention at 16x16 made a training step about
    three times slower on CPU.
    """
    return {
        "sample_size": IMAGE_SIZE,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (32, 64, 64),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "cross_attention_dim": HIDDEN_SIZE,
        "attention_head_dim": 4,
    }


# DDPM's linear betas and epsilon prediction, shared by training and sampling.
NOISE_SCHEDULE = {
    "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
}


def training_scheduler() -> DDPMScheduler:
    """Build the DDPM scheduler that noises training samples."""
    return DDPMScheduler(**NOISE_SCHEDULE, clip_sample=False)


def sampling_scheduler_config() -> dict:
    """Return the scheduler config saved with the pipeline: DDIM over the training schedule.

    `clip_sample=False` as in real Stable Diffusion: a DDIM step that clips x0 while the
    unclipped noise prediction drives the update ruins guided samples. `steps_offset=1`
    matches SD and avoids diffusers' deprecation warning.
    """
    scheduler = DDIMScheduler(
        **NOISE_SCHEDULE,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return dict(scheduler.config)


def new_text_encoder(seed: int) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(text_encoder_config())


def new_unet(seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**unet_config())


def new_components(seed: int) -> Components:
    """Build randomly initialised lab components, reproducibly from `seed`."""
    text_encoder = new_text_encoder(seed)
    unet = new_unet(seed + 1)
    return Components(
        tokenizer=load_clip_tokenizer(),
        text_encoder=text_encoder,
        unet=unet,
        scheduler_config=sampling_scheduler_config(),
    )


def save_pipeline(components: Components, folder: Path) -> None:
    """Save a diffusers `StableDiffusionPipeline` folder without VAE or safety checker."""
    folder.mkdir(parents=True, exist_ok=True)
    components.tokenizer.save_pretrained(folder / "tokenizer")
    components.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    components.unet.save_pretrained(folder / "unet", safe_serialization=True)
    DDIMScheduler.from_config(components.scheduler_config).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(_model_index(), indent=2) + "\n")


def _model_index() -> dict:
    import diffusers

    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": [None, None],
    }


def load_lab_components(folder: Path | str, device: torch.device | str = "cpu") -> Components:
    """Load a lab pipeline folder component by component."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} has no model_index.json; pass the `model/` folder that `sealer lab build` wrote")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").to(device).eval()
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").to(device).eval()
    scheduler_config = dict(DDIMScheduler.load_config(folder / "scheduler"))
    return Components(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler_config=scheduler_config)
