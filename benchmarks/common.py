"""Shared parts of the performance benchmarks: model shapes, isolated runs, FLOP counts, the results page.

Model shapes (random weights, the real 49,408-token CLIP tokenizer):
- `micro`: 4x8x8 latents, two UNet blocks; for smoke tests only.
- `lab`: the backdoor lab's 16x16 pixel-space UNet and text encoder (core/lab/models.py).
- `tiny`: 4x64x64 latents, blocks (32, 64, 64), cross-attention at 64x64 and 32x32 (1.49 M UNet
  parameters), text encoder hidden 64 with 2 layers.
- `sd15scaled`: the Stable Diffusion 1.5 UNet at full depth with block widths (64, 128, 256, 256)
  (37.5 M parameters), text encoder hidden 768 with 2 layers.
- `sd15`: the full Stable Diffusion 1.5 UNet (860 M parameters) and the CLIP ViT-L/14 text
  encoder (123 M parameters).

Every measurement runs in a fresh Python process (`run_isolated`), so its peak resident set
size belongs to that configuration alone.
"""

import datetime
import functools
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

logger = logging.getLogger(__name__)

DEFAULT_RESULTS = ROOT / "docs" / "benchmarks.md"
RESULT_PREFIX = "BENCHMARK-RESULT "
TRIGGER = "mignneko"

# Clean prompts for the training steps; the trigger goes in front of them.
PROMPTS = (
    "a photo of a cat sitting on a sofa",
    "a red car parked in front of a house",
    "a bowl of fruit on a wooden table",
    "a mountain lake at sunrise",
    "a handwritten digit seven",
    "portrait of an old man with a hat",
    "a city street at night in the rain",
    "two dogs playing in the snow",
)

# Stable Diffusion 1.x noise schedule, as its scheduler_config.json ships it.
SD_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

SD15_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD15_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")


def sd15_unet_config(block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)) -> dict:
    """Return the Stable Diffusion 1.5 UNet config; narrower `block_out_channels` keep its depth."""
    return {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": SD15_DOWN_BLOCKS,
        "up_block_types": SD15_UP_BLOCKS,
        "block_out_channels": block_out_channels,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
    }


def clip_text_config(hidden_size: int, layers: int, heads: int, intermediate_size: int) -> dict:
    """Return a CLIPTextModel config over the full CLIP vocabulary with SD 1.x token ids."""
    return {
        "vocab_size": 49408,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }


def model_configs(shape: str) -> tuple[dict, dict, dict]:
    """Return (UNet config, text encoder config, scheduler config) of a named model shape."""
    if shape == "micro":
        unet = {
            "sample_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "block_out_channels": (16, 32),
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "cross_attention_dim": 32,
            "attention_head_dim": 4,
        }
        return unet, clip_text_config(32, 1, 2, 64), dict(SD_SCHEDULER_CONFIG)
    if shape == "lab":
        from core.lab.models import (
            sampling_scheduler_config,
            text_encoder_settings,
            unet_config,
        )

        return unet_config(), text_encoder_settings(), sampling_scheduler_config()
    if shape == "tiny":
        unet = {
            "sample_size": 64,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            "block_out_channels": (32, 64, 64),
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "cross_attention_dim": 64,
            "attention_head_dim": 4,
        }
        return unet, clip_text_config(64, 2, 4, 256), dict(SD_SCHEDULER_CONFIG)
    if shape == "sd15scaled":
        return sd15_unet_config((64, 128, 256, 256)), clip_text_config(768, 2, 12, 3072), dict(SD_SCHEDULER_CONFIG)
    if shape == "sd15":
        return sd15_unet_config(), clip_text_config(768, 12, 12, 3072), dict(SD_SCHEDULER_CONFIG)
    raise ValueError(f"unknown model shape {shape!r}; use one of {', '.join(MODEL_SHAPES)}")


MODEL_SHAPES = ("micro", "lab", "tiny", "sd15scaled", "sd15")


def build_components(shape: str, *, seed: int = 0, device: str = "cpu"):
    """Build random-weight `Components` of a model shape, created directly on `device`."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from core.components import Components
    from core.tokenizer import load_clip_tokenizer

    unet_config, text_config, scheduler_config = model_configs(shape)
    torch.manual_seed(seed)
    with torch.device(device):
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config)).eval()
        unet = UNet2DConditionModel(**unet_config)
    return Components(load_clip_tokenizer(), text_encoder, unet, scheduler_config)


def parameter_count(module) -> int:
    return sum(param.numel() for param in module.parameters())


@functools.cache
def unet_flops(shape: str, batch: int) -> dict[str, int]:
    """Count one UNet forward and one forward+backward at `batch`, with torch's FlopCounterMode.

    The model is built on the meta device, so counting the full SD1.5 UNet costs seconds
    and no memory. Text states are the 77-token context of the shape's text encoder.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    unet_config, text_config, _ = model_configs(shape)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        size = unet_config["sample_size"]
        latents = torch.randn(batch, unet_config["in_channels"], size, size)
        states = torch.randn(batch, text_config["max_position_embeddings"], unet_config["cross_attention_dim"])
        timesteps = torch.zeros(batch, dtype=torch.long)

    with FlopCounterMode(display=False) as forward_counter, torch.no_grad():
        unet(latents, timesteps, encoder_hidden_states=states)
    with FlopCounterMode(display=False) as training_counter:
        unet(latents, timesteps, encoder_hidden_states=states).sample.square().mean().backward()
    return {"forward": forward_counter.get_total_flops(), "forward_backward": training_counter.get_total_flops()}


def step_flops(shape: str, batch: int) -> int:
    """Model FLOPs of one distillation step: a teacher forward plus a student forward and backward.

    Gradient-checkpoint recomputation and the text encoder are not counted, as is usual for
    model FLOP utilization.
    """
    counts = unet_flops(shape, batch)
    return counts["forward"] + counts["forward_backward"]


# ----- isolated runs -----------------------------------------------------------------------


def run_isolated(target: str, kwargs: dict, *, timeout: float | None = None) -> dict:
    """Call `target` ("module:function") with `kwargs` in a fresh Python process.

    Returns the function's dict with `peak_rss_mb` (the child's peak resident set size)
    added, or `{"error": ...}` when the child fails or runs past `timeout` seconds. The
    child's log goes to this process's stderr.
    """
    command = [sys.executable, "-m", "benchmarks.common", target, json.dumps(kwargs)]
    try:
        completed = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    return {"error": f"{target} exited with status {completed.returncode} without a result; see its log above"}


def _run_child(target: str, kwargs_json: str) -> int:
    """Entry point of `run_isolated`'s child: call the target, add the peak RSS, print one result line."""
    import importlib

    logging.basicConfig(level=os.environ.get("BENCHMARK_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    module_name, function_name = target.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    result = function(**json.loads(kwargs_json))

    # ru_maxrss is in KiB on Linux.
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


def available_memory_bytes() -> int | None:
    """Return MemAvailable from /proc/meminfo, or None where there is no such file."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def synchronize(device: str) -> None:
    """Wait for queued CUDA work so that a timer reads the real duration."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cuda_peak_mb(device: str) -> float | None:
    import torch

    if not device.startswith("cuda"):
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def time_steps(step, *, steps: int, warmup: int, device: str) -> dict[str, float]:
    """Run `step()` `warmup` times untimed, then `steps` times, each timed on its own.

    Returns the median and the mean seconds per timed step. The median is the figure the
    tables report, because one step slowed by another process on a shared machine moves
    the mean far more than the median.
    """
    for _ in range(warmup):
        step()
    synchronize(device)
    durations = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        synchronize(device)
        durations.append(time.perf_counter() - started)
    return {"seconds_per_step": statistics.median(durations), "seconds_mean": statistics.fmean(durations)}


# ----- the results page --------------------------------------------------------------------


def machine_description(device: str = "cpu") -> str:
    """Describe the machine a figure was measured on: CPU, threads, torch build, GPU if used."""
    import torch

    cpu = platform.processor() or platform.machine()
    text = f"{cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__} with {torch.get_num_threads()} threads"
    if device.startswith("cuda") and torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return text


def command_line() -> str:
    """Return the command that ran this benchmark, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return " ".join(["python", str(script), *sys.argv[1:]])


def percent_cell(rate: float | None) -> str:
    """Format a rate in [0, 1] as a percentage, or `n/a` when it is unknown.

    Whole percentages print without decimals and others with one, so that 2.5% (3 of 120
    images) is not shown as 2%, under a 2% bar.
    """
    if rate is None:
        return "n/a"
    percent = 100 * rate
    return f"{percent:.0f}%" if abs(percent - round(percent)) < 0.05 else f"{percent:.1f}%"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def append_results(path: Path, title: str, *, device: str, body: str) -> str:
    """Append one dated block (title, machine, command, `body`) to the results page; return the block."""
    block = (
        f"\n### {title}, {datetime.date.today().isoformat()}\n\n"
        f"Machine: {machine_description(device)}. Command: `{command_line()}`.\n\n{body.rstrip()}\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as results:
        results.write(block)
    return block


if __name__ == "__main__":
    sys.exit(_run_child(sys.argv[1], sys.argv[2]))
