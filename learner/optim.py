"""The optimizer step of the learner, with dynamic loss scaling whenever a trained forward runs in float16.

Why: the presets back-propagate loss / (gradient_accumulation_steps x trained timesteps), and the log-probability
is a mean over C x h x w latent elements (16,384 at SD 1.5's 4 x 64 x 64). The gradient reaching a float16 UNet's
output is then ~1e-8 per element, below float16's smallest normal (6e-5) and mostly below its smallest subnormal
(6e-8): it flushes to zero and the LoRA learns nothing. Scaling the loss by S (2^16 to start) before backward and
the gradients by 1/S before clipping keeps them representable; a step whose gradients overflowed is skipped and S
backs off (torch.amp.GradScaler semantics). bfloat16 has float32's exponent range and needs no scaling.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from services.config import TrainConfig


def needs_loss_scaling(cfg: TrainConfig) -> bool:
    """True when a trained UNet forward runs in float16: a float16 base under a LoRA, or float16 autocast.
    (Full fine-tuning trains a float32 copy of the UNet, so a float16 base alone does not count there.)"""
    fp16_base = cfg.model.dtype == "float16" and cfg.model.use_lora
    return fp16_base or cfg.performance.autocast == "fp16"


@dataclass
class StepResult:
    grad_norm: float  # global L2 norm of the unscaled gradients, before clipping (inf/nan when skipped)
    skipped: bool  # gradients were not finite: no parameter changed


class ScaledOptimizer:
    """AdamW on the trainable parameters: `backward(loss)` per micro-batch and timestep, `step()` per update.

    step(): sum gradients over data-parallel ranks (`all_reduce`), unscale, clip to `max_grad_norm`, then step
    unless a gradient is not finite (counted in `skipped_steps`); the loss scale grows or backs off as in
    torch.amp.GradScaler. Without float16 the scale is 1 and non-finite steps are skipped all the same.
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        cfg: TrainConfig,
        device: torch.device,
        all_reduce: Callable[[Sequence[torch.nn.Parameter]], None] | None = None,
    ) -> None:
        t = cfg.training
        self.params = list(params)
        self.max_grad_norm = t.max_grad_norm
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=t.learning_rate,
            betas=(t.adam_beta1, t.adam_beta2),
            weight_decay=t.adam_weight_decay,
            eps=t.adam_epsilon,
            fused=cfg.performance.fused_adamw or None,
        )
        self.loss_scaling = needs_loss_scaling(cfg)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.loss_scaling)
        self.all_reduce = all_reduce
        self.skipped_steps = 0

    @property
    def scale(self) -> float:
        """The current loss scale (1.0 without loss scaling)."""
        return float(self.scaler.get_scale())

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of `loss` (a scalar), scaled by the current loss scale."""
        self.scaler.scale(loss).backward()

    def unscaled_gradients(self) -> list[torch.Tensor | None]:
        """The accumulated gradients divided by the loss scale (copies; for tests and diagnostics)."""
        inv = 1.0 / self.scale
        return [None if p.grad is None else p.grad.detach().float() * inv for p in self.params]

    def step(self) -> StepResult:
        if self.all_reduce is not None:
            self.all_reduce(self.params)  # every rank then sees the same gradients: the same skip decision
        self.scaler.unscale_(self.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        finite = math.isfinite(grad_norm)
        if self.loss_scaling:
            self.scaler.step(self.optimizer)  # skips the step itself when unscale_ found inf/nan
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not finite:
            self.skipped_steps += 1
        return StepResult(grad_norm, skipped=not finite)

    def state_dict(self) -> dict:
        return {"adamw": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "adamw" not in state:  # checkpoints before loss scaling held the AdamW state alone
            state = {"adamw": state, "scaler": {}}
        self.optimizer.load_state_dict(state["adamw"])
        if self.loss_scaling and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
