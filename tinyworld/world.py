"""The tiny world: deterministic 64x64 renders of a coloured shape on a plain background, in a named style.

Caption grammar (fixed, small vocabulary; `parse` inverts `Scene.caption`):
    a {size} {colour} {subject}[ at the {position}] on a {background} background, {style} style
    a large red star on a blue background, striped style
    a small green heart at the left on a black background, dotted style
The held-out character is named by its rare token and keeps its fixed colours, so its captions carry no colour:
    a large sks character at the top on a gray background, flat style
The held-out style is named by its rare token:  ... on a white background, zwx style.
Position "center" is left out of the caption.

Splits: "base" (the 8 shapes x 7 styles: the only thing base training sees), "identity" (the held-out character,
flat style), "style" (base shapes in the held-out style), "combo" (the held-out character in the held-out style).
The held-out character is a teal robot with a red antenna, two big eyes and a mouth; the held-out style paints the
subject with concentric near-black rings. Both are chosen to read clearly at 64x64 and through a 4x or 8x VAE.

Changing a colour, a shape or the vocabulary changes what minisd-tiny (weights/tiny) and the classifier learned:
retrain them after such a change.
"""
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 64
SS = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges, a soft alpha

SUBJECTS = ("circle", "square", "triangle", "star", "heart", "plus", "diamond", "moon")
STYLES = ("flat", "outlined", "striped", "dotted", "checkered", "pixelated", "soft")
COLOURS = {"red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (245, 215, 40), "green": (40, 170, 60),
           "blue": (40, 90, 220), "purple": (140, 60, 200), "pink": (245, 130, 190), "white": (245, 245, 245)}
BACKGROUNDS = {"black": (20, 20, 20), "gray": (128, 128, 128), "white": COLOURS["white"], "blue": COLOURS["blue"],
               "green": COLOURS["green"], "yellow": COLOURS["yellow"]}
SIZES = {"small": 13, "large": 22}  # radius in pixels
POSITIONS = ("center", "left", "right", "top", "bottom")
IDENTITY_TOKEN, STYLE_TOKEN = "sks", "zwx"
HELDOUT_SUBJECT = "robot"  # captioned "sks character"
HELDOUT_STYLE = "rings"  # captioned "zwx style"
ROBOT = {"body": (0, 165, 165), "eye": (250, 250, 250), "dark": (15, 15, 15), "antenna": (230, 30, 30)}  # fixed
SPLITS = ("base", "identity", "style", "combo")


@dataclass(frozen=True)
class Scene:
    subject: str  # one of SUBJECTS, or HELDOUT_SUBJECT
    colour: str | None  # one of COLOURS; None for the held-out character (it has fixed colours)
    background: str  # one of BACKGROUNDS
    style: str  # one of STYLES, or HELDOUT_STYLE
    size: str = "large"
    position: str = "center"

    def caption(self):
        thing = f"{IDENTITY_TOKEN} character" if self.subject == HELDOUT_SUBJECT else f"{self.colour} {self.subject}"
        where = "" if self.position == "center" else f" at the {self.position}"
        style = STYLE_TOKEN if self.style == HELDOUT_STYLE else self.style
        return f"a {self.size} {thing}{where} on a {self.background} background, {style} style"


_CAPTION = re.compile(rf"a (\w+) (?:{IDENTITY_TOKEN} character|(\w+) (\w+))(?: at the (\w+))?"
                      r" on a (\w+) background, (\w+) style")


def parse(caption):
    """Scene.caption() -> Scene."""
    size, colour, subject, position, background, style = _CAPTION.fullmatch(caption).groups()
    return Scene(subject or HELDOUT_SUBJECT, colour, background, HELDOUT_STYLE if style == STYLE_TOKEN else style,
                 size, position or "center")


def vocabulary():
    """Every word a caption can contain."""
    return sorted({"a", "at", "the", "on", "background", "style", "character", IDENTITY_TOKEN, STYLE_TOKEN,
                   *SUBJECTS, *STYLES, *COLOURS, *BACKGROUNDS, *SIZES, *POSITIONS})


def _centre(scene):
    shift = 30 - SIZES[scene.size]  # keeps the subject inside the frame: 8 px for large, 17 px for small
    dx, dy = {"center": (0, 0), "left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}[scene.position]
    return 32 + dx * shift, 32 + dy * shift


def _layers(scene):
    """Hi-res 'L' masks: the body (takes the style) and, for the character, face parts drawn on top: [(mask, rgb)]."""
    (cx, cy), r = _centre(scene), SIZES[scene.size]

    def canvas():
        im = Image.new("L", (SIZE * SS, SIZE * SS), 0)
        return im, ImageDraw.Draw(im)

    def xy(x, y):  # shape units (radius 1, y down) -> hi-res pixels
        return (cx + x * r) * SS, (cy + y * r) * SS

    def ellipse(d, x, y, rx, ry, fill=255):
        d.ellipse([xy(x - rx, y - ry), xy(x + rx, y + ry)], fill=fill)

    def rect(d, x0, y0, x1, y1, radius=0.0):
        d.rounded_rectangle([xy(x0, y0), xy(x1, y1)], radius=radius * r * SS, fill=255)

    body, d = canvas()
    s = scene.subject
    if s == "circle":
        ellipse(d, 0, 0, 1, 1)
    elif s == "square":
        rect(d, -0.85, -0.85, 0.85, 0.85)
    elif s == "triangle":
        d.polygon([xy(0, -1), xy(1.0, 0.8), xy(-1.0, 0.8)], fill=255)
    elif s == "star":
        d.polygon([xy(math.cos(a) * k, math.sin(a) * k) for i in range(10)
                   for a, k in [(-math.pi / 2 + i * math.pi / 5, 1.05 if i % 2 == 0 else 0.45)]], fill=255)
    elif s == "heart":  # the classic parametric heart, y in [-12, 17]: it sits a little low (so minisd-tiny learned it)
        t = np.linspace(0, 2 * math.pi, 80)
        x, y = 16 * np.sin(t) ** 3, -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        d.polygon([xy(a / 16.5, (b + 2.5) / 16.5) for a, b in zip(x, y)], fill=255)
    elif s == "plus":
        rect(d, -0.95, -0.32, 0.95, 0.32)
        rect(d, -0.32, -0.95, 0.32, 0.95)
    elif s == "diamond":
        d.polygon([xy(0, -1.05), xy(0.7, 0), xy(0, 1.05), xy(-0.7, 0)], fill=255)
    elif s == "moon":
        ellipse(d, 0, 0, 1, 1)
        ellipse(d, 0.5, -0.25, 0.8, 0.8, fill=0)
    elif s == HELDOUT_SUBJECT:  # a boxy robot: antenna, wide head with two big eyes and a mouth, two legs
        rect(d, -0.07, -0.9, 0.07, -0.6)
        rect(d, -0.85, -0.65, 0.85, 0.35, radius=0.25)
        rect(d, -0.6, 0.3, -0.2, 1.0)
        rect(d, 0.2, 0.3, 0.6, 1.0)
        parts = []
        for colour, draw in [("antenna", lambda d: ellipse(d, 0, -0.83, 0.17, 0.17)),
                             ("eye", lambda d: [ellipse(d, x, -0.25, 0.27, 0.27) for x in (-0.4, 0.4)]),
                             ("dark", lambda d: [ellipse(d, x, -0.2, 0.12, 0.12) for x in (-0.4, 0.4)]),  # pupils
                             ("dark", lambda d: rect(d, -0.35, 0.08, 0.35, 0.18))]:  # mouth
            im, dd = canvas()
            draw(dd)
            parts.append((im, ROBOT[colour]))
        return body, parts
    else:
        raise ValueError(f"unknown subject {s!r}")
    return body, []


def _alpha(mask_hi):
    return np.asarray(mask_hi.resize((SIZE, SIZE), Image.BOX), dtype=np.float32)[..., None] / 255


def _contrast(rgb):
    """The pattern colour of a style: a dark shade of light colours, a light tint of dark ones."""
    rgb = np.asarray(rgb, dtype=np.float32)
    return rgb * 0.4 if rgb @ (0.299, 0.587, 0.114) > 140 else rgb + (255 - rgb) * 0.65


def render(scene):
    """Scene -> (PIL RGB 64x64 image, bool (64, 64) silhouette mask of the subject, whatever the style)."""
    body_hi, parts = _layers(scene)
    a = _alpha(body_hi)
    fill = np.asarray(ROBOT["body"] if scene.subject == HELDOUT_SUBJECT else COLOURS[scene.colour], np.float32)
    ink = _contrast(fill)
    y, x = np.mgrid[:SIZE, :SIZE][..., None].astype(np.float32)
    mask = a[..., 0] > 0.5
    pattern = None
    if scene.style == "outlined":  # a 3 px rim of the colour, the inside shows the background
        low = Image.fromarray(np.uint8(a[..., 0] * 255 + 0.5))
        a = a - np.asarray(low.filter(ImageFilter.MinFilter(7)), np.float32)[..., None] / 255
    elif scene.style == "striped":  # horizontal bands, 4 px each
        pattern = (y // 4) % 2 == 1
    elif scene.style == "dotted":  # dots of diameter ~4 on an 8 px grid, alternate rows offset by half a period
        xs = x + 4 * ((y // 8) % 2)
        pattern = (xs % 8 - 3.5) ** 2 + (y % 8 - 3.5) ** 2 < 5.0
    elif scene.style == "checkered":  # 6 px squares
        pattern = ((x // 6) + (y // 6)) % 2 == 1
    elif scene.style == HELDOUT_STYLE:  # concentric near-black rings, 3 px each, about the subject's centre
        cx, cy = _centre(scene)
        pattern = (np.hypot(x - cx + 0.5, y - cy + 0.5) // 3) % 2 == 1
        ink = np.full(3, 15, np.float32)
    colour = np.where(pattern, ink, fill) if pattern is not None else fill
    img = np.asarray(BACKGROUNDS[scene.background], np.float32) * (1 - a) + colour * a
    for part, rgb in parts:
        pa = _alpha(part)
        img = img * (1 - pa) + np.asarray(rgb, np.float32) * pa
        mask |= pa[..., 0] > 0.5
    out = Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8))
    if scene.style == "pixelated":  # a mosaic of 6 px blocks (11 x 6 = 66, cropped by 1 on each side)
        out = out.resize((11, 11), Image.BOX).resize((66, 66), Image.NEAREST).crop((1, 1, 65, 65))
    elif scene.style == "soft":
        out = out.filter(ImageFilter.GaussianBlur(2.5))
    return out, mask


def _ok(rgb, background):
    """Subject and background colours far enough apart (RGB distance) to read the shape."""
    return np.linalg.norm(np.subtract(rgb, BACKGROUNDS[background])) > 120


def random_scene(rng, split="base"):
    """A random Scene of a split (see the module docstring); rng is a numpy Generator."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    held_subject, held_style = split in ("identity", "combo"), split in ("style", "combo")
    subject = HELDOUT_SUBJECT if held_subject else SUBJECTS[rng.integers(len(SUBJECTS))]
    style = HELDOUT_STYLE if held_style else "flat" if held_subject else STYLES[rng.integers(len(STYLES))]
    return scene_for(rng, subject, style)


def scene_for(rng, subject, style):
    """A Scene of this subject and style with a random colour, background, size and position."""
    pick = lambda seq: seq[rng.integers(len(seq))]
    colour = None if subject == HELDOUT_SUBJECT else pick(list(COLOURS))
    rgb = ROBOT["body"] if colour is None else COLOURS[colour]
    background = pick([b for b in BACKGROUNDS if b != colour and _ok(rgb, b)])
    return Scene(subject, colour, background, style, pick(list(SIZES)), pick(POSITIONS))


def dataset(n, seed=0, split="base"):
    """n (PIL image, caption, Scene) triples; distinct scenes as long as the split has enough of them."""
    rng, scenes = np.random.default_rng(seed), []
    for tries in range(100 * n):
        if len(scenes) == n:
            break
        s = random_scene(rng, split)
        if s not in scenes or tries >= 50 * n:
            scenes.append(s)
    return [(render(s)[0], s.caption(), s) for s in scenes]


def write_set(folder, n, seed=0, split="identity"):
    """Writes NNN.png + NNN.txt (its caption), the kohya-style folder a LoRA trainer reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, caption, _) in enumerate(dataset(n, seed, split)):
        image.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption + "\n")
