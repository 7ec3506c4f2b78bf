"""What a run may ask of the machine: a device that exists, and memory that is there.

The estimates are lower bounds of the activation memory (they count a few of the largest tensors, not all of them),
so that a size no machine at hand can hold is refused in one line before any work; a size near the limit may still
run out, and the CLIs report that in one line as well. "Available" is the free device memory, and on the CPU the
smaller of the kernel's MemAvailable and what the address-space limit (ulimit -v) leaves.
"""
import torch

try:
    import resource  # POSIX
except ImportError:
    resource = None

# Activation bytes per (latent pixel x channels of the U-Net's first level x element size), lower bounds:
SAMPLE_FACTOR = 16  # inference: the skip connections (layers + 1 per level), the feed-forward's 8-channel GEGLU input
TRAIN_FACTOR = 200  # training keeps every activation for the backward (below the peaks in docs/performance.md#memory)
TRAIN_FACTOR_CHECKPOINTED = 80  # --grad-checkpointing (likewise below its measured peaks)


def check_device(spec):
    """torch.device(spec), if this machine has it; else a ValueError naming --device."""
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"--device {spec}: not a device (cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: CUDA is not available on this machine (use --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {spec}: MPS is not available on this machine (use --device cpu)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {spec}: minisd runs on cpu, cuda or mps")
    return device


def _kib(path, field):
    """A 'Field:   N kB' value of a /proc file in bytes, or None."""
    try:
        with open(path) as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":")), None)
    except OSError:
        return None


def available_bytes(device):
    """Free memory for `device` in bytes, or None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    free = _kib("/proc/meminfo", "MemAvailable")
    soft, _ = resource.getrlimit(resource.RLIMIT_AS) if resource else (None, None)
    used = _kib("/proc/self/status", "VmSize")
    if resource and soft != resource.RLIM_INFINITY and used is not None:
        free = min(free if free is not None else soft, soft - used)
    return free


def sampling_bytes(sd, batch, height, width, guided):
    """A lower bound of the memory sd.sample(batch images, height x width) needs beyond the weights: the larger of
    the U-Net's activations (twice the batch with classifier-free guidance) and the VAE decoder's full-resolution
    layers (two images at a time, three tensors live), plus the float32 images."""
    f, c0 = sd.vae.cfg.downscale, sd.unet.cfg.model_channels * sd.unet.cfg.channel_mult[0]
    elem = torch.finfo(sd.dtype).bits // 8
    unet = batch * (2 if guided else 1) * (height // f) * (width // f) * c0 * elem * SAMPLE_FACTOR
    vae = min(batch, 2) * height * width * sd.vae.cfg.ch * sd.vae.cfg.ch_mult[0] * elem * 3
    return max(unet, vae) + batch * 3 * height * width * 4


def training_bytes(sd, batch, size, checkpointed):
    """A lower bound of the activation memory of one training step (batch images of size x size), or of encoding
    one image and its mirror into the latent cache, whichever is larger."""
    f, c0 = sd.vae.cfg.downscale, sd.unet.cfg.model_channels * sd.unet.cfg.channel_mult[0]
    elem = torch.finfo(sd.dtype).bits // 8
    unet = batch * (size // f) ** 2 * c0 * elem * (TRAIN_FACTOR_CHECKPOINTED if checkpointed else TRAIN_FACTOR)
    vae = 2 * size * size * sd.vae.cfg.ch * sd.vae.cfg.ch_mult[0] * elem * 3
    return max(unet, vae)


def require(needed, device, what):
    """A ValueError naming `what` (the flags) if `needed` bytes exceed what `device` has free."""
    free = available_bytes(device)
    if free is not None and needed > free:
        raise ValueError(f"{what}: needs at least {needed / 2 ** 30:.2f} GiB of {device.type} memory, "
                         f"{max(free, 0) / 2 ** 30:.2f} GiB available")
