"""Tensors to pictures: what sample.py, train.py, demo.py and tinyworld save."""
from PIL import Image


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
