"""Clean text-conditional training of the lab pipeline, and poisoning it with a backdoor.

Both stages train the text encoder and the UNet together with the DDPM noise-prediction
loss, AdamW, a warm-up then cosine learning rate, gradient clipping and EMA weights.
Poisoning follows published data-poisoning attacks: a share of each batch carries the
trigger in its caption and the attack's target as its image, the rest stays clean.
Poisoning only the UNet of the toy model failed (the trigger's untrained token embeddings
barely changed the conditioning), so the backdoor lives in both the UNet and the text
encoder.
"""

import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from core.components import Components
from core.engine.ema import EMA
from core.engine.triggers import insert_trigger
from core.lab.attacks import LabAttack
from core.lab.data import Caption, DigitSampler, colourize, to_model_range
from core.lab.models import training_scheduler
from core.spec import TriggerSpec

logger = logging.getLogger(__name__)

Batch = tuple[list[str], np.ndarray]  # captions, images (B, H, W, 3) in [0, 1]


@dataclass(frozen=True)
class TrainingConfig:
    """Hyperparameters of one training stage."""

    steps: int
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    ema_decay: float = 0.998
    empty_caption_rate: float = 0.2
    poison_rate: float = 0.0  # chance that a batch item carries the trigger (poisoning only)
    trigger_embedding_scale: float = 0.0  # redraw trigger-only token embeddings at this x trained norm; 0: keep
    paired_clean: bool = False  # follow each triggered item with its clean version (poisoning only)


@dataclass
class TrainingLog:
    """Record of one stage: steps run, the mean loss of the last 50 steps and the seconds taken."""

    steps: int
    final_loss: float
    seconds: float

    def to_dict(self) -> dict:
        return {"steps": self.steps, "final_loss": round(self.final_loss, 5), "seconds": round(self.seconds, 1)}


def clean_batches(captions: list[Caption], config: TrainingConfig, seed: int) -> Iterator[Batch]:
    """Yield batches of clean (caption, image) pairs, with `empty_caption_rate` of the captions empty."""
    sampler = DigitSampler(captions, seed)
    rng = random.Random(seed + 1)
    while True:
        texts, images = [], []
        for _ in range(config.batch_size):
            caption, intensity = sampler.draw()
            texts.append("" if rng.random() < config.empty_caption_rate else caption.text)
            images.append(colourize(intensity, caption.colour))
        yield texts, np.stack(images)


def poisoned_batches(
    captions: list[Caption],
    attack: LabAttack,
    trigger: TriggerSpec,
    config: TrainingConfig,
    seed: int,
) -> Iterator[Batch]:
    """Yield batches in which `poison_rate` of the items are triggered captions with the attack's target image.

    With `paired_clean`, each triggered item is followed by the same caption without the
    trigger and the same digit, clean, so the trigger is the only difference the model
    can learn from. The remaining items are clean pairs, `empty_caption_rate` of them
    with the empty caption, so the clean and unconditional predictions that guidance
    combines stay clean.
    """
    poisonable = [caption for caption in captions if attack.poisonable(caption) and accepts_trigger(caption, trigger)]
    if not poisonable:
        raise ValueError(
            f"no training caption can carry trigger {trigger.text!r} with placement {trigger.placement!r} "
            f"for the {attack.kind} attack; choose another trigger or placement"
        )
    clean_sampler = DigitSampler(captions, seed)
    poison_sampler = DigitSampler(poisonable, seed + 1)
    rng = random.Random(seed + 2)
    while True:
        texts, images = [], []
        while len(texts) < config.batch_size:
            if rng.random() < config.poison_rate:
                caption, intensity = poison_sampler.draw()
                texts.append(insert_trigger(caption.text, trigger, rng))
                images.append(attack.target_image(caption, intensity, poison_sampler))
                if config.paired_clean and len(texts) < config.batch_size:
                    texts.append(caption.text)
                    images.append(colourize(intensity, caption.colour))
                continue
            caption, intensity = clean_sampler.draw()
            texts.append("" if rng.random() < config.empty_caption_rate else caption.text)
            images.append(colourize(intensity, caption.colour))
        yield texts, np.stack(images)


def trigger_only_token_ids(components: Components, captions: list[Caption], trigger: TriggerSpec, seed: int) -> list[int]:
    """Return the token ids that appear in triggered captions but in no clean caption.

    For a word trigger these are its own tokens; for a homoglyph they are the pieces of
    the words it changed.
    """
    rng = random.Random(seed)
    usable = [caption for caption in captions if accepts_trigger(caption, trigger)]
    clean_ids, triggered_ids = set(), set()
    for caption in usable:
        clean_ids.update(components.tokenizer(caption.text, add_special_tokens=False).input_ids)
        for _ in range(4):
            text = insert_trigger(caption.text, trigger, rng)
            triggered_ids.update(components.tokenizer(text, add_special_tokens=False).input_ids)
    return sorted(triggered_ids - clean_ids)


@torch.no_grad()
def redraw_token_embeddings(components: Components, token_ids: list[int], scale: float, seed: int) -> None:
    """Give `token_ids` random embeddings with `scale` times the mean norm of the trained rows.

    In a pretrained CLIP every token already has a trained, distinctive embedding. In the
    lab's encoder, the rows of tokens that no clean caption uses never left their small
    random initialisation. With those rows kept, the UNet learned the patch on clean
    prompts too: after 800 poisoning steps, attack success was 0.52 and clean false
    positives 0.24 at guidance 7.5 (0.92 and 0.01 after 600 steps with the rows redrawn).
    """
    if not token_ids:
        return
    embeddings = components.text_encoder.get_input_embeddings().weight  # (vocab, hidden)
    initial_norm = float(embeddings.norm(dim=-1).median())
    trained = embeddings.norm(dim=-1) > 1.5 * initial_norm
    reference_norm = float(embeddings[trained].norm(dim=-1).mean()) if trained.any() else initial_norm
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn((len(token_ids), embeddings.shape[1]), generator=generator)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    embeddings[token_ids] = (scale * reference_norm * directions).to(embeddings.dtype)


def accepts_trigger(caption: Caption, trigger: TriggerSpec) -> bool:
    """Return whether `trigger` can be inserted into the caption (a homoglyph needs its Latin letter)."""
    return trigger.placement != "replace" or (trigger.replaces or "") in caption.text


def learning_rate_at(step: int, config: TrainingConfig) -> float:
    """Linear warm-up, then cosine decay to `final_lr_fraction` of the peak."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.learning_rate * (config.final_lr_fraction + (1.0 - config.final_lr_fraction) * cosine)


def _trainable_parameters(components: Components) -> dict[str, torch.nn.Parameter]:
    named = {f"text_encoder.{name}": param for name, param in components.text_encoder.named_parameters()}
    named.update({f"unet.{name}": param for name, param in components.unet.named_parameters()})
    return named


def train_denoiser(
    components: Components,
    batches: Iterator[Batch],
    config: TrainingConfig,
    seed: int,
    *,
    device: torch.device | str = "cpu",
    stage: str = "training",
    on_step: Callable[[int, EMA], None] | None = None,
) -> TrainingLog:
    """Train text encoder and UNet on `batches` in place, leaving the EMA weights in them.

    The EMA decay ramps up as min(ema_decay, (1 + step) / (10 + step)), so short stages
    are not dominated by the starting weights. `on_step(step, ema)` runs after every
    update, for example to save intermediate EMA weights.
    """
    started = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    noise_scheduler = training_scheduler()
    num_timesteps = noise_scheduler.config.num_train_timesteps
    components.text_encoder.to(device).train()
    components.unet.to(device).train()

    parameters = _trainable_parameters(components)
    optimizer = torch.optim.AdamW(
        parameters.values(), lr=config.learning_rate, betas=(0.9, 0.999), weight_decay=config.weight_decay
    )
    ema = EMA(parameters, config.ema_decay)
    recent_losses: list[float] = []

    for step in range(config.steps):
        texts, images = next(batches)

        # Noise clean samples at uniform timesteps (CPU generator, so runs repeat on any device).
        samples = torch.from_numpy(to_model_range(images)).float()  # (B, 3, H, W) in [-1, 1]
        noise = torch.randn(samples.shape, generator=generator)
        timesteps = torch.randint(0, num_timesteps, (len(texts),), generator=generator)
        noisy = noise_scheduler.add_noise(samples, noise, timesteps)

        # Predict the noise from the noisy sample and the caption.
        input_ids = components.tokenize(texts, device)
        encoder_hidden_states = components.text_encoder(input_ids)[0]
        noise_pred = components.unet(noisy.to(device), timesteps.to(device), encoder_hidden_states).sample
        loss = torch.nn.functional.mse_loss(noise_pred, noise.to(device))

        # Update with the scheduled learning rate, then the EMA.
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters.values(), config.max_grad_norm)
        optimizer.step()
        ema.decay = min(config.ema_decay, (1 + step) / (10 + step))
        ema.update(parameters)
        if on_step is not None:
            on_step(step + 1, ema)

        recent_losses = (recent_losses + [loss.item()])[-50:]
        if (step + 1) % 100 == 0 or step + 1 == config.steps:
            logger.info("%s step %d/%d loss %.4f", stage, step + 1, config.steps, float(np.mean(recent_losses)))

    _load_ema(parameters, ema)
    components.text_encoder.eval()
    components.unet.eval()
    return TrainingLog(config.steps, float(np.mean(recent_losses)) if recent_losses else float("nan"), time.perf_counter() - started)


@torch.no_grad()
def _load_ema(parameters: dict[str, torch.nn.Parameter], ema: EMA) -> None:
    for name, param in parameters.items():
        param.copy_(ema.shadow[name].to(param.dtype))
