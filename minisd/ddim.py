"""DDPM noise schedule and the DDIM sampler (Song et al. 2020), as LDM and diffusers' DDIMScheduler run it."""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Schedule:
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"

    @property
    def alphas_cumprod(self):  # (1000,) float64
        if self.beta_schedule == "scaled_linear":  # linear in sqrt(beta)
            betas = torch.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, self.num_train_timesteps,
                                   dtype=torch.float64) ** 2
        elif self.beta_schedule == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, self.num_train_timesteps, dtype=torch.float64)
        else:
            raise ValueError(f"unsupported beta_schedule {self.beta_schedule!r} (expected scaled_linear or linear)")
        return torch.cumprod(1.0 - betas, dim=0)

    def ddim_timesteps(self, steps):
        """Uniform 'leading' spacing plus an offset of 1 (LDM's make_ddim_timesteps, diffusers' steps_offset=1):
        50 steps -> 981, 961, ..., 21, 1."""
        if not 0 < steps < self.num_train_timesteps:  # the offset 1: T steps would reach timestep T, beyond the table
            raise ValueError(f"steps must be in 1..{self.num_train_timesteps - 1}, got {steps}")
        step = self.num_train_timesteps // steps
        return (torch.arange(steps) * step + 1).flip(0)


def ddim_step(x, eps, alpha, alpha_prev, eta=0.0, noise=None):
    """One DDIM update x_t -> x_{t_prev}, given cumulative alphas (python floats or 0-d tensors)."""
    x0 = (x - (1 - alpha) ** 0.5 * eps) / alpha ** 0.5
    sigma = eta * ((1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)) ** 0.5
    x_prev = alpha_prev ** 0.5 * x0 + (1 - alpha_prev - sigma ** 2) ** 0.5 * eps
    if eta > 0:
        x_prev = x_prev + sigma * noise
    return x_prev


def ddim_alphas(schedule: Schedule, steps):
    """[(t, alpha_t, alpha_prev)] for each step; the last step's alpha_prev is alphas_cumprod[0]
    (diffusers' set_alpha_to_one=False; LDM's ddim_alphas_prev)."""
    ac = schedule.alphas_cumprod
    ts = schedule.ddim_timesteps(steps).tolist()
    prev = ts[1:] + [None]
    return [(t, ac[t].item(), ac[p].item() if p is not None else ac[0].item()) for t, p in zip(ts, prev)]
