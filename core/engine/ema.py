"""Exponential moving average of the student's weights."""

import torch


class EMA:
    """Shadow copy of parameters: shadow = decay * shadow + (1 - decay) * param after each step.

    A decay of 0 makes the shadow equal to the latest weights. The shadow lives in float32
    whatever the parameters' dtype, so small updates are not rounded away.
    """

    def __init__(self, parameters: dict[str, torch.nn.Parameter], decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay {decay} is outside [0, 1); use for example 0.99")
        self.decay = decay
        self.shadow = {name: param.detach().float().clone() for name, param in parameters.items()}

    @torch.no_grad()
    def update(self, parameters: dict[str, torch.nn.Parameter]) -> None:
        for name, param in parameters.items():
            self.shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters (e.g. {sorted(missing)[0]}); the saved state is from another model")
        for name in self.shadow:
            self.shadow[name].copy_(state[name])
