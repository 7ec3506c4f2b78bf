"""Tensors to pictures, and PNG files with their settings: what sample.py, train.py, demo.py and tinyworld save."""
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .files import atomic_save


def to_pil(images):
    """(B, 3, H, W) in [0, 1] -> PIL images (clamped, then rounded like diffusers' numpy_to_pil)."""
    arr = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]


def grid(images, cols):
    """PIL images of one size -> one sheet, `cols` a row, white where a row is short."""
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        sheet.paste(im, ((i % cols) * w, (i // cols) * h))
    return sheet


def a1111_parameters(prompt, negative_prompt, fields):
    """AUTOMATIC1111's `parameters` text: the prompt, "Negative prompt: ..." on the next line, then "Key: value"
    pairs joined by ", " (Steps, Sampler, CFG scale, Seed, Size, Model hash, ...): what webui's PNG Info, civitai
    and other tools read back from a PNG."""
    return f"{prompt}\nNegative prompt: {negative_prompt}\n" + ", ".join(f"{k}: {v}" for k, v in fields.items())


def save_png(image, path, parameters=None):
    """A PIL image as a PNG with the `parameters` text chunk (if given), written to a temporary file and renamed: a
    full disk or a kill leaves the previous file, never a torn one."""
    info = PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    atomic_save(lambda p: image.save(p, format="PNG", pnginfo=info), path)
