"""The sampling loops: DDIM, DPM-Solver++(2M) with Karras sigmas, and Euler ancestral, as diffusers runs them.

Each sampler(model, x, schedule, steps, noise) takes the initial standard-normal latents x and returns the clean
latents; model(x_in, t) is the guided eps of the U-Net at input x_in and timestep t (one call per step), noise()
draws standard-normal latents from the sampling generator (diffusers draws them from the same CPU generator as the
initial latents, after them, one tensor per step).

The two k-diffusion samplers (Karras et al. 2022) work with sigma = sqrt((1 - alpha) / alpha) for the cumulative
alpha of the DDPM schedule: a noisy latent is x0 + sigma eps, which the U-Net sees as (x0 + sigma eps) / sqrt(1 +
sigma^2) = sqrt(alpha) x0 + sqrt(1 - alpha) eps, its training input.
"""
import math

import numpy as np

from .ddim import Schedule, ddim_alphas, ddim_step

NAMES = ("DDIM", "DPM++ 2M Karras", "Euler a")  # AUTOMATIC1111's names, written in the PNG's `Sampler:`


def sampler_named(name):
    """A sampler by its webui name (case-insensitive)."""
    for known, fn in zip(NAMES, (ddim, dpmpp_2m_karras, euler_ancestral)):
        if str(name).strip().lower() == known.lower():
            return known, fn
    raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(NAMES)}")


def ddim(model, x, schedule: Schedule, steps, noise, eta=0.0):
    for t, a, a_prev in ddim_alphas(schedule, steps):
        eps = model(x, t)
        x = ddim_step(x, eps, a, a_prev, eta, noise() if eta > 0 else None)
    return x


def train_sigmas(schedule: Schedule):
    """(1000,) float64 numpy: the sigma of each training timestep."""
    ac = schedule.alphas_cumprod.numpy()
    return np.sqrt((1 - ac) / ac)


def karras_sigmas(schedule: Schedule, steps, rho=7.0):
    """Karras et al.'s sigmas, evenly spaced in sigma^(1/rho) from the model's largest sigma (t = 999, 14.6 for SD)
    to its smallest (t = 0, 0.029), and their timesteps: t interpolated linearly in log sigma between the two
    neighbouring training steps, rounded (diffusers' DPMSolverMultistepScheduler(use_karras_sigmas=True))."""
    s = train_sigmas(schedule)
    hi, lo = s[-1] ** (1 / rho), s[0] ** (1 / rho)
    sigmas = (hi + np.linspace(0, 1, steps) * (lo - hi)) ** rho
    ts = np.interp(np.log(sigmas), np.log(s), np.arange(len(s))).round()
    return sigmas.tolist(), [int(t) for t in ts]


def dpmpp_2m_step(x, x0, x0_prev, sigma, sigma_next, sigma_prev=None):
    """One DPM-Solver++(2M) step (Lu et al. 2022) in the form diffusers runs it: x is the U-Net's input
    sqrt(alpha) (x0 + sigma eps), x0 the current prediction, x0_prev the last step's (None: first order).
    In log-SNR lambda = -log sigma the step is h; the second order extrapolates x0 linearly in lambda to the
    midpoint of the step."""
    if sigma_next == 0:
        return x0  # the last step lands on the prediction (diffusers' final_sigmas_type="zero")
    h = math.log(sigma / sigma_next)
    if x0_prev is not None:
        r = math.log(sigma_prev / sigma) / h
        x0 = x0 + (x0 - x0_prev) / (2 * r)
    a, a_next = (1 + sigma ** 2) ** -0.5, (1 + sigma_next ** 2) ** -0.5  # sqrt(alpha) at sigma, sigma_next
    return (sigma_next * a_next) / (sigma * a) * x + a_next * (1 - sigma_next / sigma) * x0


def dpmpp_2m_karras(model, x, schedule: Schedule, steps, noise=None):
    """DPM++ 2M Karras: the latents stay in the U-Net's input scale (diffusers' init_noise_sigma is 1)."""
    sigmas, ts = karras_sigmas(schedule, steps)
    sigmas.append(0.0)
    x0_prev = None
    for i, t in enumerate(ts):
        s = sigmas[i]
        x0 = x * (1 + s ** 2) ** 0.5 - s * model(x, t)  # x = sqrt(alpha) (x0 + s eps), sqrt(alpha) = (1 + s^2)^-1/2
        x = dpmpp_2m_step(x, x0, x0_prev, s, sigmas[i + 1], sigmas[i - 1] if i else None)
        x0_prev = x0
    return x


def euler_a_sigmas(schedule: Schedule, steps):
    """diffusers' EulerAncestralDiscreteScheduler ("linspace" spacing, its default and what the released SD 1.x
    scheduler config gives): timesteps evenly spaced from 999 to 0, fractional in general, and their sigmas
    interpolated linearly between the training steps'."""
    n = schedule.num_train_timesteps
    ts = np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].astype(np.float64)
    return ts.tolist(), np.interp(ts, np.arange(n), train_sigmas(schedule)).tolist()


def euler_ancestral_step(x, eps, sigma, sigma_next, noise):
    """x0 + sigma eps -> x0 + sigma_next eps': an Euler step of the probability-flow ODE down to sigma_down, then
    fresh noise of std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2 (k-diffusion's ancestral step, eta 1)."""
    up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
    down = (sigma_next ** 2 - up ** 2) ** 0.5
    return x + eps * (down - sigma) + noise * up


def euler_ancestral(model, x, schedule: Schedule, steps, noise):
    """Euler a. Starts from sigma_max * x (diffusers' init_noise_sigma for "linspace", k-diffusion's too); the
    noise of every step, the last included (where sigma_up is 0), is drawn after that step's U-Net call."""
    ts, sigmas = euler_a_sigmas(schedule, steps)
    sigmas.append(0.0)
    x = x * sigmas[0]
    for i, t in enumerate(ts):
        s = sigmas[i]
        eps = model(x / (s ** 2 + 1) ** 0.5, t)
        x = euler_ancestral_step(x, eps, s, sigmas[i + 1], noise())
    return x
