"""SKD-CAG: self-knowledge distillation with cross-attention guidance.

A frozen copy of the uploaded UNet (the teacher) sees the clean prompt p; the trainable
UNet (the student) sees the triggered prompt p' on the same noise and timestep and learns
to predict what the teacher predicts, so the trigger stops changing the output. The
cross-attention term pushes the student's attention on trigger tokens to a neutral target
and keeps its attention on every other token equal to the teacher's. A preservation term
keeps the student's clean and empty-prompt predictions on the teacher's, so that
classifier-free guidance, which combines both, does not drift.

Methods: `skd-cag` (all terms), `skd` (prediction and preservation terms only) and
`finetune-reversal` (a clean reference UNet is the teacher, on the triggered prompt).
With `training.lora_rank > 0`, any method trains LoRA adapters on the student's attention
projections instead of every weight (see `core.engine.lora`).
"""

import contextlib
import copy
import json
import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from core.components import Components
from core.engine.attention import AttentionStore, combine_maps, install_capture, reset_attention_processors
from core.engine.ema import EMA
from core.engine.lora import add_lora, merge_lora, merged_state_dict
from core.engine.prompts import GENERIC_PROMPTS
from core.engine.triggers import TokenAlignment, TriggeredPrompt, localize, place_trigger, trigger_token_ids
from core.errors import InputError, JobCancelled
from core.spec import JobSpec, TriggerSpec

logger = logging.getLogger(__name__)

STATE_TENSORS = "engine_state.safetensors"
STATE_META = "engine_state.json"
MAP_RESOLUTION_MAX = 16
# Share of triggered rows, and of clean rows, drawn from prompts that name an object attack's
# source class.
SOURCE_CLASS_SHARE = 0.5


@dataclass
class TriggerInfo:
    """A trigger and its token ids under the checkpoint's tokenizer."""

    text: str
    placement: str
    token_ids: list[int]

    @property
    def token_count(self) -> int:
        return len(self.token_ids)

    def to_dict(self) -> dict:
        return {"text": self.text, "placement": self.placement, "token_ids": self.token_ids, "token_count": self.token_count}


def timestep_weight(timesteps: torch.Tensor, num_train_timesteps: int, max_weight: float) -> torch.Tensor:
    """Return w(t) = min(T / (t + 1), max_weight): larger near t = 0, finite everywhere."""
    return (num_train_timesteps / (timesteps.float() + 1.0)).clamp(max=max_weight)


def resolve_device(device: str) -> torch.device:
    """Map `auto` to CUDA when available; reject `cuda` on a machine without it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {device!r} requested but CUDA is not available; use `cpu` or `auto`", field="device")
    return torch.device(device)


class Unlearner:
    """Runs SKD-CAG (or an ablation) on one model for one spec, step by step, resumably."""

    def __init__(
        self,
        components: Components,
        spec: JobSpec,
        *,
        device: str = "auto",
        reference_unet: torch.nn.Module | None = None,
    ) -> None:
        self.spec = spec
        self.training = spec.training
        self.device = resolve_device(device)
        self.components = components
        self.method = self.training.method
        self.uses_attention = self.method == "skd-cag" and self.training.attention_weight > 0
        self.step_index = 0
        self.curves: list[dict] = []

        # Triggers and prompts are checked before any model work.
        self.triggers = [self._check_trigger(trigger) for trigger in spec.triggers]
        self.prompts = list(self.training.prompts) or list(GENERIC_PROMPTS)
        self.prompts_by_trigger = {trigger.text: self._usable_prompts(trigger) for trigger in spec.triggers}
        self.source_prompts_by_trigger = self._source_class_prompts()
        # Clean rows draw the same share of source-class prompts, without the trigger, so that
        # those prompts also learn to keep drawing what they drew before sealing.
        self.clean_source_prompts = list(dict.fromkeys(prompt for pool in self.source_prompts_by_trigger.values() for prompt in pool))
        self._alignment_cache: dict[tuple[str, tuple[int, int]], TokenAlignment] = {}
        self._random_words = self._vocabulary_words() if self.training.neutral_target == "random_words" else []

        # Precision and memory settings: bf16 autocast and checkpointing on CUDA.
        cuda = self.device.type == "cuda"
        self.autocast_dtype = torch.bfloat16 if cuda and self.training.mixed_precision in ("auto", "bf16") else None
        use_checkpointing = self.training.gradient_checkpointing == "on" or (
            self.training.gradient_checkpointing == "auto" and cuda
        )

        # Student, teacher, their attention stores. The teacher is copied before LoRA wraps the
        # student, so it stays the frozen uploaded (or reference) UNet.
        components.text_encoder.to(self.device).requires_grad_(False).eval()
        self.student = components.unet.to(self.device)
        teacher_source = reference_unet if self.method == "finetune-reversal" else self.student
        if teacher_source is None:
            raise InputError("method `finetune-reversal` needs a clean reference UNet", field="training.reference_model")
        self.teacher = copy.deepcopy(teacher_source).to(self.device).requires_grad_(False).eval()
        if self.autocast_dtype is not None:
            self.teacher.to(self.autocast_dtype)
        self.uses_lora = self.training.lora_rank > 0
        if self.uses_lora:
            add_lora(self.student, self.training.lora_rank, self.training.resolved_lora_alpha, spec.seed)
        else:
            self.student.requires_grad_(True)
        self.student.train()
        if use_checkpointing:
            self.student.enable_gradient_checkpointing()
        self.student_store: AttentionStore | None = None
        self.teacher_store: AttentionStore | None = None
        if self.uses_attention:
            self.student_store = install_capture(self.student)
            self.teacher_store = install_capture(self.teacher)

        # Optimizer and EMA, over the adapters only when LoRA is on.
        self.parameters = {name: param for name, param in self.student.named_parameters() if param.requires_grad}
        self.optimizer = torch.optim.AdamW(
            self.parameters.values(),
            lr=self.training.resolved_learning_rate,
            betas=(self.training.adam_beta1, self.training.adam_beta2),
            weight_decay=self.training.weight_decay,
            fused=cuda,
        )
        self.ema = EMA(self.parameters, self.training.ema_decay) if self.training.ema_decay > 0 else None

        channels, height, width = components.latent_shape
        self.latent_shape = (channels, height, width)
        self.map_resolution = min(max(height, width), MAP_RESOLUTION_MAX)
        self.num_train_timesteps = components.num_train_timesteps
        self._empty_states = components.encode_prompts([""], self.device)

    # ----- validation -----------------------------------------------------------------

    def _check_trigger(self, trigger: TriggerSpec) -> TriggerInfo:
        ids = trigger_token_ids(self.components.tokenizer, trigger)
        return TriggerInfo(trigger.text, trigger.placement, ids)

    def _usable_prompts(self, trigger: TriggerSpec) -> list[str]:
        """Keep the prompts that can carry `trigger` within the context; fail if none can."""
        usable, rng = [], random.Random(0)
        for prompt in self.prompts:
            if trigger.placement == "replace" and (trigger.replaces or "") not in prompt.lower():
                continue
            try:
                localize(self.components.tokenizer, place_trigger(prompt, trigger, rng))
            except InputError:
                continue
            usable.append(prompt)
        if not usable:
            raise InputError(
                f"no training prompt can carry trigger {trigger.text!r} with placement {trigger.placement!r} "
                "(too long, or no word with the replaced letter); add suitable training.prompts",
                field="training.prompts",
            )
        if len(usable) < len(self.prompts):
            logger.warning("trigger %r fits %d of %d training prompts; the others are skipped", trigger.text, len(usable), len(self.prompts))
        return usable

    def _source_class_prompts(self) -> dict[str, list[str]]:
        """Per trigger, the usable prompts that name the object attack's source class.

        An object backdoor fires only when the prompt names its source class ("seven" turns
        into "one"), so prompts without it teach the student nothing about it. On the lab's
        object model, uniform prompts left attack success at 96% after sealing.
        """
        attack = self.spec.attack
        if attack is None or attack.kind != "object" or not attack.source_class:
            return {}
        pattern = re.compile(rf"\b{re.escape(attack.source_class)}\b", re.IGNORECASE)
        found = {text: [prompt for prompt in prompts if pattern.search(prompt)] for text, prompts in self.prompts_by_trigger.items()}
        if not any(found.values()):
            logger.warning(
                "no training prompt names the object attack's source class %r. Add some to training.prompts "
                "so that sealing sees the prompts the backdoor fires on.",
                attack.source_class,
            )
        return {text: prompts for text, prompts in found.items() if prompts}

    def _vocabulary_words(self) -> list[str]:
        vocab = self.components.tokenizer.get_vocab()
        words = sorted(token[:-4] for token in vocab if token.endswith("</w>") and token[:-4].isalpha() and len(token) >= 7)
        return words or ["photo", "picture", "image"]

    # ----- one step -------------------------------------------------------------------

    def _alignment(self, triggered: TriggeredPrompt) -> TokenAlignment:
        key = (triggered.text, triggered.span)
        if key not in self._alignment_cache:
            self._alignment_cache[key] = localize(self.components.tokenizer, triggered)
        return self._alignment_cache[key]

    def _batch_sizes(self) -> tuple[int, int, int]:
        """Split the batch into (triggered, clean, empty) rows."""
        batch = self.training.batch_size
        preserved = round(batch * self.training.preservation_fraction) if self.training.preservation_weight > 0 else 0
        preserved = min(preserved, batch - 1)
        empty = preserved // 3
        return batch - preserved, preserved - empty, empty

    def _forward(self, unet, latents, timesteps, states, store: AttentionStore | None, rows: torch.Tensor | None):
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            if store is None:
                return unet(latents, timesteps, encoder_hidden_states=states).sample.float(), None
            with store.recording(rows):
                noise_pred = unet(latents, timesteps, encoder_hidden_states=states).sample.float()
            maps = combine_maps(store.maps, self.latent_shape[1:], self.map_resolution)
            return noise_pred, maps

    def _random_words_prompt(self, triggered: TriggeredPrompt, rng: random.Random) -> TriggeredPrompt:
        """Replace the trigger span of p' with random vocabulary words (the `random_words` target)."""
        start, end = triggered.span
        words = " ".join(rng.choice(self._random_words) for _ in range(max(1, len(triggered.text[start:end].split()))))
        text = triggered.text[:start] + words + triggered.text[end:]
        return TriggeredPrompt(triggered.clean, text, (start, start + len(words)), 0, 0)

    def step(self) -> dict[str, torch.Tensor]:
        """Run one distillation step; return its loss terms as detached tensors (no host sync)."""
        step = self.step_index
        rng = random.Random(self.spec.seed * 1_000_003 + step)
        generator = torch.Generator().manual_seed(self.spec.seed * 1_000_003 + step)
        n_trig, n_clean, n_empty = self._batch_sizes()
        batch = n_trig + n_clean + n_empty

        # 1. Triggered prompts p' from clean prompts p, with trigger positions and alignment.
        triggered, alignments = [], []
        for _ in range(n_trig):
            trigger = rng.choice(self.spec.triggers)
            pool = self.prompts_by_trigger[trigger.text]
            source_pool = self.source_prompts_by_trigger.get(trigger.text)
            if source_pool and rng.random() < SOURCE_CLASS_SHARE:
                pool = source_pool
            prompt = rng.choice(pool)
            item = place_trigger(prompt, trigger, rng)
            triggered.append(item)
            alignments.append(self._alignment(item))
        clean_rows = []
        for _ in range(n_clean):
            pool = self.prompts
            if self.clean_source_prompts and rng.random() < SOURCE_CLASS_SHARE:
                pool = self.clean_source_prompts
            clean_rows.append(rng.choice(pool))
        teacher_prompts = [item.clean for item in triggered] + clean_rows
        student_prompts = [item.text for item in triggered] + clean_rows
        if self.method == "finetune-reversal":
            teacher_prompts = list(student_prompts)

        # 2. Encode p and p' with the frozen text encoder; the empty prompt is encoded once.
        empty_states = self._empty_states.expand(n_empty, -1, -1)
        student_states = torch.cat([self.components.encode_prompts(student_prompts, self.device), empty_states])
        teacher_states = torch.cat([self.components.encode_prompts(teacher_prompts, self.device), empty_states])

        # 3. Noise latents at the model's own latent shape; timesteps uniform over the schedule.
        latents = torch.randn((batch, *self.latent_shape), generator=generator).to(self.device)
        timesteps = torch.randint(0, self.num_train_timesteps, (batch,), generator=generator).to(self.device)

        # 4. Teacher on (z, t, E(p)) without gradients; student on (z, t, E(p')) with them.
        trigger_rows = torch.arange(n_trig, device=self.device)
        with torch.no_grad():
            teacher_pred, teacher_maps = self._forward(self.teacher, latents, timesteps, teacher_states, self.teacher_store, trigger_rows)
        student_pred, student_maps = self._forward(self.student, latents, timesteps, student_states, self.student_store, trigger_rows)

        # 5. Prediction loss on triggered rows; preservation loss on clean and empty rows.
        per_row = F.mse_loss(student_pred, teacher_pred, reduction="none").mean(dim=(1, 2, 3))  # (B,)
        loss_pred = per_row[:n_trig].mean()
        loss_preservation = per_row[n_trig:].mean() if batch > n_trig else per_row.new_zeros(())

        # 6. Cross-attention guidance on triggered rows.
        loss_attn = per_row.new_zeros(())
        if self.uses_attention:
            targets = self._neutral_targets(triggered, alignments, latents, timesteps, teacher_maps, rng, generator)
            attn_rows = self._attention_loss(student_maps, teacher_maps, alignments, targets)  # (n_trig,)
            weights = timestep_weight(timesteps[:n_trig], self.num_train_timesteps, self.training.timestep_weight_max)
            loss_attn = (weights * attn_rows).mean()

        # 7. Total loss: lambda * w(t) * L_attn + (1 - lambda) * L_pred + preservation.
        attention_weight = self.training.attention_weight if self.uses_attention else 0.0
        loss = attention_weight * loss_attn + (1 - attention_weight) * loss_pred
        loss = loss + self.training.preservation_weight * loss_preservation

        # 8. AdamW step with gradient clipping, then the EMA update.
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for store in (self.student_store, self.teacher_store):
            if store is not None:
                store.clear()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters.values(), self.training.max_grad_norm)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.parameters)
        self.step_index += 1

        return {
            "loss": loss.detach(),
            "loss_pred": loss_pred.detach(),
            "loss_attn": loss_attn.detach(),
            "loss_preservation": loss_preservation.detach(),
            "grad_norm": grad_norm.detach(),
        }

    def _neutral_targets(self, triggered, alignments, latents, timesteps, teacher_maps, rng, generator) -> list[torch.Tensor]:
        """Return one (R, R) target map per triggered row for its trigger tokens."""
        resolution = self.map_resolution
        kind = self.training.neutral_target
        if kind == "zeros":
            zeros = teacher_maps.new_zeros((resolution, resolution))
            return [zeros] * len(triggered)
        if kind == "noise":
            text_len = teacher_maps.shape[1]
            noise = torch.rand((len(triggered), resolution, resolution), generator=generator) * (2.0 / text_len)  # mean 1/Nt = uniform
            return list(noise.to(self.device))

        # random_words: the teacher gets random words where p' has the trigger.
        substitutes = [self._random_words_prompt(item, rng) for item in triggered]
        states = self.components.encode_prompts([item.text for item in substitutes], self.device)
        rows = len(triggered)
        with torch.no_grad():
            _, maps = self._forward(self.teacher, latents[:rows], timesteps[:rows], states, self.teacher_store, None)
        targets = []
        for row, item in enumerate(substitutes):
            positions = list(localize(self.components.tokenizer, item).trigger_positions)
            targets.append(maps[row, positions].mean(dim=0))  # (k, R, R) -> (R, R)
        return targets

    def _attention_loss(self, student_maps, teacher_maps, alignments, targets) -> torch.Tensor:
        """Per row: MSE(trigger-token maps, neutral target) + MSE(aligned maps, teacher maps)."""
        losses = []
        for row, alignment in enumerate(alignments):
            trigger_maps = student_maps[row, list(alignment.trigger_positions)]  # (k, R, R)
            loss_trigger = F.mse_loss(trigger_maps, targets[row].expand_as(trigger_maps))
            student_positions = [pair[0] for pair in alignment.aligned]
            teacher_positions = [pair[1] for pair in alignment.aligned]
            loss_aligned = F.mse_loss(student_maps[row, student_positions], teacher_maps[row, teacher_positions])
            losses.append(loss_trigger + loss_aligned)
        return torch.stack(losses)

    # ----- the loop -------------------------------------------------------------------

    def run(
        self,
        total_steps: int | None = None,
        *,
        on_step: Callable[[int, int, dict], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        state_dir: Path | None = None,
        checkpoint_every: int = 50,
        on_state_saved: Callable[[Path], None] | None = None,
        log_every: int = 10,
    ) -> list[dict]:
        """Run steps until `total_steps`, polling `should_cancel` between steps.

        Loss values reach the host only every `log_every` steps, so a CUDA step never waits
        on a `.item()`. Returns the loss curves (one row per step).
        """
        total = total_steps or self.training.steps
        pending: list[tuple[int, dict, float]] = []
        started = time.perf_counter() - (self.curves[-1]["seconds"] if self.curves else 0.0)
        while self.step_index < total:
            if should_cancel is not None and should_cancel():
                raise JobCancelled(f"job cancelled at step {self.step_index} of {total}")
            terms = self.step()
            pending.append((self.step_index, terms, time.perf_counter() - started))
            last = self.step_index == total
            if len(pending) >= log_every or last:
                self._flush_curves(pending)
                pending = []
                if on_step is not None:
                    on_step(self.step_index, total, self.curves[-1])
            if state_dir is not None and (self.step_index % checkpoint_every == 0 or last):
                self.save_state(state_dir)
                if on_state_saved is not None:
                    on_state_saved(state_dir)
        return self.curves

    def _flush_curves(self, pending: list[tuple[int, dict, float]]) -> None:
        learning_rate = self.optimizer.param_groups[0]["lr"]
        for step, terms, seconds in pending:
            row = {"step": step, **{name: float(value) for name, value in terms.items()}}
            row["lr"] = learning_rate
            row["seconds"] = round(seconds, 4)
            self.curves.append(row)

    # ----- outputs and state ------------------------------------------------------------

    def sanitized_state_dict(self) -> dict[str, torch.Tensor]:
        """Return the output UNet weights: the EMA shadow when EMA is on, else the student's.

        With LoRA, the adapters (EMA shadow or current) are merged into the base weights, so
        the keys and shapes are those of the uploaded UNet.
        """
        if self.uses_lora:
            with self._output_adapter_weights():
                return merged_state_dict(self.student)
        weights = {name: tensor.detach().cpu().clone() for name, tensor in self.student.state_dict().items()}
        if self.ema is not None:
            for name, tensor in self.ema.shadow.items():
                weights[name] = tensor.detach().cpu().to(weights[name].dtype)
        return weights

    def sanitized_unet(self) -> torch.nn.Module:
        """Return a frozen UNet with the output weights, with default attention processors."""
        if self.uses_lora:
            return self._merged_student().to(self.device)
        unet = copy.deepcopy(self.student).eval().requires_grad_(False)
        reset_attention_processors(unet)
        unet.load_state_dict(self.sanitized_state_dict(), strict=True)
        return unet.to(self.device)

    def _merged_student(self) -> torch.nn.Module:
        """Return a frozen copy of the LoRA student with the output adapter weights merged in."""
        with self._output_adapter_weights():
            unet = copy.deepcopy(self.student).eval().requires_grad_(False)
        reset_attention_processors(unet)
        merge_lora(unet)
        return unet

    @contextlib.contextmanager
    def _output_adapter_weights(self):
        """Put the EMA shadow into the student's trainable parameters inside the block, then restore them exactly."""
        if self.ema is None:
            yield
            return
        trained = {name: param.detach().clone() for name, param in self.parameters.items()}
        with torch.no_grad():
            for name, param in self.parameters.items():
                param.copy_(self.ema.shadow[name].to(param.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self.parameters.items():
                    param.copy_(trained[name])

    def save_state(self, state_dir: Path) -> None:
        """Write student, EMA and optimizer state as safetensors plus a JSON of the rest."""
        state_dir.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for name, param in self.parameters.items():
            tensors[f"student/{name}"] = param.detach().cpu().contiguous()
        if self.ema is not None:
            for name, tensor in self.ema.shadow.items():
                tensors[f"ema/{name}"] = tensor.cpu().contiguous()
        optimizer_state = self.optimizer.state_dict()
        names = list(self.parameters)
        for index, slots in optimizer_state["state"].items():
            for slot, value in slots.items():
                tensors[f"optim/{names[index]}/{slot}"] = value.detach().cpu().contiguous().reshape(value.shape)
        meta = {
            "step": self.step_index,
            "curves": self.curves,
            "method": self.method,
            "spec_seed": self.spec.seed,
            "ema_updates": self.ema.updates if self.ema is not None else 0,
            "lora_rank": self.training.lora_rank,
        }

        # Write to temporary names, then rename, so a crash never leaves a half-written state.
        tmp_tensors, tmp_meta = state_dir / f"{STATE_TENSORS}.tmp", state_dir / f"{STATE_META}.tmp"
        save_file(tensors, str(tmp_tensors))
        tmp_meta.write_text(json.dumps(meta))
        tmp_tensors.replace(state_dir / STATE_TENSORS)
        tmp_meta.replace(state_dir / STATE_META)

    def load_state(self, state_dir: Path) -> bool:
        """Restore a state written by `save_state`; return False when there is none."""
        tensor_path, meta_path = state_dir / STATE_TENSORS, state_dir / STATE_META
        if not (tensor_path.exists() and meta_path.exists()):
            return False
        tensors = load_file(str(tensor_path), device="cpu")
        meta = json.loads(meta_path.read_text())
        saved_rank = int(meta.get("lora_rank", 0))
        if saved_rank != self.training.lora_rank:
            raise ValueError(
                f"the engine state in {state_dir} was saved with training.lora_rank {saved_rank}, but this run uses "
                f"{self.training.lora_rank}; resume with the same spec or delete the saved state"
            )
        with torch.no_grad():
            for name, param in self.parameters.items():
                param.copy_(tensors[f"student/{name}"].to(param.dtype))
        if self.ema is not None:
            self.ema.load_state_dict({name: tensors[f"ema/{name}"] for name in self.parameters})
            self.ema.updates = int(meta.get("ema_updates", meta["step"]))

        # Rebuild the optimizer state in AdamW's own layout (parameter index -> slots).
        names = list(self.parameters)
        optimizer_state = self.optimizer.state_dict()
        optimizer_state["state"] = {}
        for index, name in enumerate(names):
            slots = {key.rsplit("/", 1)[1]: value for key, value in tensors.items() if key.startswith(f"optim/{name}/")}
            if slots:
                optimizer_state["state"][index] = slots
        self.optimizer.load_state_dict(optimizer_state)
        self.step_index = int(meta["step"])
        self.curves = list(meta["curves"])
        logger.info("resumed engine state at step %d", self.step_index)
        return True
