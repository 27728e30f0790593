"""Exponential moving average of the student's weights."""

import torch


class EMA:
    """Shadow copy of parameters: shadow = d * shadow + (1 - d) * param after each step.

    With `warmup`, the decay of update n (counting from 1) is d = min(decay, n / (n + 9)),
    the usual ramp, so that a run of a few hundred steps is not dominated by the starting
    weights: with a fixed 0.99, 22% of the shadow would still be the backdoored weights
    after 150 steps. A decay of 0 makes the shadow equal to the latest weights. The shadow
    lives in float32 whatever the parameters' dtype, so small updates are not rounded away.
    """

    def __init__(self, parameters: dict[str, torch.nn.Parameter], decay: float, *, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay {decay} is outside [0, 1); use for example 0.99")
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.shadow = {name: param.detach().float().clone() for name, param in parameters.items()}

    def current_decay(self) -> float:
        """Return the decay that the next update uses."""
        if not self.warmup:
            return self.decay
        count = self.updates + 1
        return min(self.decay, count / (count + 9))

    @torch.no_grad()
    def update(self, parameters: dict[str, torch.nn.Parameter]) -> None:
        decay = self.current_decay()
        for name, param in parameters.items():
            self.shadow[name].lerp_(param.detach().float(), 1.0 - decay)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters (e.g. {sorted(missing)[0]}); the saved state is from another model")
        for name in self.shadow:
            self.shadow[name].copy_(state[name])
