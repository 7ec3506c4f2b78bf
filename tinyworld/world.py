"""The tiny world, version 2: deterministic 64x64 renders of a shape or a character on a plain background, in a style.

Caption grammar (fixed, small vocabulary; `parse` reads a caption back into its fields):
    a {size} {colour} [{name} ]{subject}[ at the {position}] on a {background} background, {style word} style
    a large red star on a blue background, striped style
    a small green vak character at the left on a black background, wavy style
    a large yellow sks character on a gray background, zwx style          <- the identity, in the held-out style
Position "center" is left out of the caption.

Subjects: eight shapes and a **character class** of 512 procedural members (`member(id)`: body outline, eye count and
spacing, mouth, ears / antenna / hat, legs). Every subject takes any colour of the one palette, so colour identifies
nothing. The identity to learn is one member (`IDENTITY`); further members are reserved (`RESERVED_MEMBERS`), each
usable as the identity of an experiment by its id. Held-out members and their neighbours (one trait away) never
appear in base data, so no base character is the identity under another name.

Styles: a **parametric family** (`Style(family, period, angle)`): flat, outlined, striped, dotted, checkered, wavy,
hatched, pixelated in base data at several periods and angles; rings (the held-out style), zigzag and bricks are
reserved at fine, medium and coarse periods (`HELD_STYLES`). Every texture period is at least 6 px, three latent
pixels of minisd-tiny's 2x VAE; every identity feature is at least 4 px (two latent pixels) wide, even at "small".

Rare words: "sks", "zwx" and six more (`RARE_WORDS`) occur in base captions as meaningless names ("a large red vak
star", "a small blue sks character"), so their embeddings are trained, as a real text encoder's rare tokens are.
Experiments caption the identity "sks character" and the held-out style "zwx style".

Splits: "base" (what base training sees), "identity" (the identity in several base styles), "style" (base subjects
in the held-out style), "combo" (the identity in the held-out style); `random_scene(rng, split, identity=, style=)`
takes any held-out member and style. Changing the world changes what minisd-tiny (weights/tiny) and the judges
learned: retrain them after such a change.
"""
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 64
SS = 4  # drawn at 4x and box-filtered down: anti-aliased edges, a soft alpha

SHAPES = ("circle", "square", "triangle", "star", "heart", "plus", "diamond", "moon")
CHARACTER = "character"
SUBJECTS = (*SHAPES, CHARACTER)
COLOURS = {"red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (245, 215, 40), "green": (40, 170, 60),
           "blue": (40, 90, 220), "purple": (140, 60, 200), "pink": (245, 130, 190), "white": (245, 245, 245),
           "teal": (0, 165, 165)}
BACKGROUNDS = {"black": (20, 20, 20), "gray": (128, 128, 128), "white": COLOURS["white"], "blue": COLOURS["blue"],
               "green": COLOURS["green"], "yellow": COLOURS["yellow"]}
SIZES = {"small": 17, "large": 25}  # radius in pixels
POSITIONS = ("center", "left", "right", "top", "bottom")
RARE_WORDS = ("sks", "zwx", "ohwx", "vak", "qel", "dum", "rix", "tov")
IDENTITY_WORD, STYLE_WORD = "sks", "zwx"
SPLITS = ("base", "identity", "style", "combo")

# character traits; a member id is the mixed-radix number (body, eyes, mouth, top, legs)
BODIES = ("round", "box", "tall", "bell")
EYES = ("one", "two-close", "two-wide", "three")
MOUTHS = ("none", "bar", "smile", "open")
TOPS = ("none", "ears", "antenna", "hat")
LEGS = ("none", "legs")
TRAITS = (BODIES, EYES, MOUTHS, TOPS, LEGS)
MEMBERS = math.prod(len(t) for t in TRAITS)  # 512


def member(traits):
    """(body, eyes, mouth, top, legs) names -> member id."""
    i = 0
    for names, t in zip(TRAITS, traits):
        i = i * len(names) + names.index(t)
    return i


def traits(member_id):
    """member id -> (body, eyes, mouth, top, legs) names."""
    out = []
    for names in reversed(TRAITS):
        member_id, k = divmod(member_id, len(names))
        out.append(names[k])
    return tuple(reversed(out))


IDENTITY = member(("bell", "three", "smile", "antenna", "legs"))
RESERVED_MEMBERS = (member(("round", "one", "open", "ears", "none")), member(("box", "two-wide", "bar", "hat", "legs")),
                    member(("tall", "two-close", "none", "ears", "legs")), member(("bell", "one", "bar", "hat", "none")))
HELD_MEMBERS = (IDENTITY, *RESERVED_MEMBERS)


def _near_held(member_id):
    return any(sum(a != b for a, b in zip(traits(member_id), traits(h))) <= 1 for h in HELD_MEMBERS)


BASE_MEMBERS = tuple(i for i in range(MEMBERS) if not _near_held(i))


@dataclass(frozen=True)
class Style:
    family: str
    period: int = 0  # pixels (0 for flat / outlined)
    angle: int = 0  # degrees, for stripes

    @property
    def name(self):
        return f"{self.family}/{self.period}/{self.angle}"

    @property
    def file_name(self):
        """The name in a file or folder name: bricks-6-0."""
        return self.name.replace("/", "-")


BASE_FAMILIES = ("flat", "outlined", "striped", "dotted", "checkered", "wavy", "hatched", "pixelated")
HELD_FAMILIES = ("rings", "zigzag", "bricks")
FAMILIES = (*BASE_FAMILIES, *HELD_FAMILIES)
BASE_STYLES = (Style("flat"), Style("outlined"),
               *(Style("striped", p, a) for p in (6, 8, 10) for a in (0, 45, 90, 135)),
               *(Style(f, p) for f in ("dotted", "checkered", "wavy") for p in (6, 8, 10)),
               Style("hatched", 6), Style("hatched", 8), Style("pixelated", 4), Style("pixelated", 6))
HELD_STYLE = Style("rings", 8)  # the experiments' style: concentric rings about the subject's centre
HELD_STYLES = (HELD_STYLE, Style("rings", 6), Style("rings", 12), Style("zigzag", 6), Style("zigzag", 8),
               Style("zigzag", 12), Style("bricks", 6), Style("bricks", 8), Style("bricks", 12))


def held_style(name):
    """The held-out Style called `name` ("bricks/6/0", or "bricks/6": the angle 0 may be left out), or None."""
    return next((s for s in HELD_STYLES if s.name in (name, f"{name}/0")), None)


@dataclass(frozen=True)
class Scene:
    subject: str  # one of SUBJECTS
    colour: str  # one of COLOURS
    background: str  # one of BACKGROUNDS
    style: Style
    size: str = "large"
    position: str = "center"
    member: int | None = None  # the character's member id (characters only)
    name: str | None = None  # a rare word before the subject, or none
    style_word: str | None = None  # the caption's word for the style; None: its family

    def caption(self):
        name = f"{self.name} " if self.name else ""
        where = "" if self.position == "center" else f" at the {self.position}"
        word = self.style_word or self.style.family
        return f"a {self.size} {self.colour} {name}{self.subject}{where} on a {self.background} background, {word} style"


_CAPTION = re.compile(r"a (\w+) (\w+) (?:(\w+) )?(\w+)(?: at the (\w+))? on a (\w+) background, (\w+) style")


def parse(caption):
    """Scene.caption() -> {size, colour, name, subject, position, background, style_word}."""
    m = _CAPTION.fullmatch(caption)
    if m is None:
        raise ValueError(f"not a tiny-world caption: {caption!r}")
    keys = ("size", "colour", "name", "subject", "position", "background", "style_word")
    fields = dict(zip(keys, m.groups()))
    fields["position"] = fields["position"] or "center"
    return fields


def vocabulary():
    """Every word a caption can contain (held-out style families are never written: they have rare words)."""
    return sorted({"a", "at", "the", "on", "background", "style", *SUBJECTS, *BASE_FAMILIES, *COLOURS, *BACKGROUNDS,
                   *SIZES, *POSITIONS, *RARE_WORDS})


def _centre(scene):
    shift = 30 - SIZES[scene.size]  # keeps the subject inside the frame: 5 px for large, 13 px for small
    dx, dy = {"center": (0, 0), "left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}[scene.position]
    return 32 + dx * shift, 32 + dy * shift


class _Pen:
    """Draws in shape units (radius 1, y down) on hi-res 'L' canvases about a centre."""

    def __init__(self, centre, radius):
        self.c, self.r = centre, radius

    def canvas(self):
        im = Image.new("L", (SIZE * SS, SIZE * SS), 0)
        return im, ImageDraw.Draw(im)

    def xy(self, x, y):
        return (self.c[0] + x * self.r) * SS, (self.c[1] + y * self.r) * SS

    def ellipse(self, d, x, y, rx, ry, fill=255):
        d.ellipse([self.xy(x - rx, y - ry), self.xy(x + rx, y + ry)], fill=fill)

    def rect(self, d, x0, y0, x1, y1, radius=0.0, fill=255):
        d.rounded_rectangle([self.xy(x0, y0), self.xy(x1, y1)], radius=radius * self.r * SS, fill=fill)

    def polygon(self, d, points, fill=255):
        d.polygon([self.xy(x, y) for x, y in points], fill=fill)


def _shape(pen, d, s):
    if s == "circle":
        pen.ellipse(d, 0, 0, 1, 1)
    elif s == "square":
        pen.rect(d, -0.85, -0.85, 0.85, 0.85)
    elif s == "triangle":
        pen.polygon(d, [(0, -1), (1.0, 0.8), (-1.0, 0.8)])
    elif s == "star":
        pen.polygon(d, [(math.cos(a) * k, math.sin(a) * k) for i in range(10)
                        for a, k in [(-math.pi / 2 + i * math.pi / 5, 1.05 if i % 2 == 0 else 0.45)]])
    elif s == "heart":
        t = np.linspace(0, 2 * math.pi, 80)
        x, y = 16 * np.sin(t) ** 3, -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pen.polygon(d, [(a / 16.5, (b + 2.5) / 16.5) for a, b in zip(x, y)])
    elif s == "plus":
        pen.rect(d, -0.95, -0.32, 0.95, 0.32)
        pen.rect(d, -0.32, -0.95, 0.32, 0.95)
    elif s == "diamond":
        pen.polygon(d, [(0, -1.05), (0.7, 0), (0, 1.05), (-0.7, 0)])
    elif s == "moon":
        pen.ellipse(d, 0, 0, 1, 1)
        pen.ellipse(d, 0.5, -0.25, 0.8, 0.8, fill=0)
    else:
        raise ValueError(f"unknown shape {s!r}")


_HALF_WIDTH = {"round": 0.85, "box": 0.8, "tall": 0.55, "bell": 0.62}  # at eye height


def _character(pen, d, member_id):
    """Draws the member's body (outline, top, legs) on d; returns its face as hi-res 'L' masks."""
    body, eyes, mouth, top, legs = traits(member_id)
    if body == "round":
        pen.ellipse(d, 0, 0.05, 0.85, 0.8)
    elif body == "box":
        pen.rect(d, -0.8, -0.6, 0.8, 0.8, radius=0.2)
    elif body == "tall":
        pen.rect(d, -0.55, -0.7, 0.55, 0.85, radius=0.3)
    else:  # bell: narrow top, wide base
        pen.polygon(d, [(-0.4, -0.65), (0.4, -0.65), (0.95, 0.8), (-0.95, 0.8)])
    if top == "ears":
        for s in (-1, 1):
            pen.polygon(d, [(s * 0.15, -0.5), (s * 0.6, -0.5), (s * 0.45, -1.0)])
    elif top == "antenna":
        pen.rect(d, -0.12, -0.95, 0.12, -0.5)
        pen.ellipse(d, 0, -0.9, 0.22, 0.18)
    elif top == "hat":
        pen.rect(d, -0.4, -1.0, 0.4, -0.55)
        pen.rect(d, -0.7, -0.62, 0.7, -0.48)
    if legs == "legs":
        for x in (-0.55, 0.2):
            pen.rect(d, x, 0.7, x + 0.35, 1.0)
    face, fd = pen.canvas()
    w = _HALF_WIDTH[body]
    xs = {"one": (0,), "two-close": (-0.3 * w, 0.3 * w), "two-wide": (-0.6 * w, 0.6 * w),
          "three": (-0.6 * w, 0, 0.6 * w)}[eyes]
    for x in xs:  # eye discs 0.26 r across at "small" = 4.4 px: two latent pixels
        pen.ellipse(fd, x, -0.15, 0.13 if eyes == "three" else 0.17, 0.17)
    if mouth == "bar":
        pen.rect(fd, -0.35, 0.25, 0.35, 0.5)
    elif mouth == "smile":
        fd.chord([pen.xy(-0.4, -0.05), pen.xy(0.4, 0.55)], 0, 180, fill=255)
    elif mouth == "open":
        pen.ellipse(fd, 0, 0.38, 0.2, 0.17)
    return face


def _alpha(mask_hi):
    return np.asarray(mask_hi.resize((SIZE, SIZE), Image.BOX), dtype=np.float32)[..., None] / 255


def _contrast(rgb):
    """The pattern colour of a style: a dark shade of light colours, a light tint of dark ones."""
    rgb = np.asarray(rgb, dtype=np.float32)
    return rgb * 0.35 if rgb @ (0.299, 0.587, 0.114) > 140 else rgb + (255 - rgb) * 0.65


def _pattern(style, centre):
    """(64, 64, 1) bool: where a textured style paints its ink; None for flat, outlined and pixelated."""
    y, x = np.mgrid[:SIZE, :SIZE][..., None].astype(np.float32) + 0.5
    p, half = style.period, style.period / 2
    f = style.family
    if f == "striped":
        a = math.radians(style.angle)
        return ((x * math.cos(a) + y * math.sin(a)) // half) % 2 == 1
    if f == "dotted":  # dots of diameter ~p/2 on a p grid, alternate rows offset by half a period
        xs = x + half * ((y // p) % 2)
        return (xs % p - half) ** 2 + (y % p - half) ** 2 < (p / 4 + 0.5) ** 2
    if f == "checkered":
        return ((x // half) + (y // half)) % 2 == 1
    if f == "wavy":
        return ((y + 0.3 * p * np.sin(2 * math.pi * x / (2 * p))) // half) % 2 == 1
    if f == "hatched":  # two diagonal families of 2 px lines
        return ((x + y) % p < 2) | ((x - y) % p < 2)
    if f == "rings":
        return (np.hypot(x - centre[0], y - centre[1]) // half) % 2 == 1
    if f == "zigzag":
        tri = half * np.abs(((x / p) % 1) * 2 - 1)
        return ((y + tri) // half) % 2 == 1
    if f == "bricks":  # mortar: 2 px lines between rows of height p/2 and bricks p long, offset every row
        row = y // half
        return ((y % half) < 2) | (((x + half * (row % 2)) % p) < 2)
    return None


def render(scene):
    """Scene -> (PIL RGB 64x64 image, bool (64, 64) silhouette mask of the subject, whatever the style)."""
    centre, st = _centre(scene), scene.style
    pen = _Pen(centre, SIZES[scene.size])
    body_hi, d = pen.canvas()
    face_hi = _character(pen, d, scene.member) if scene.subject == CHARACTER else None
    if face_hi is None:
        _shape(pen, d, scene.subject)
    a = _alpha(body_hi)
    mask = a[..., 0] > 0.5
    fill = np.asarray(COLOURS[scene.colour], np.float32)
    if st.family == "outlined":  # a 4 px rim of the colour, the inside shows the background
        low = Image.fromarray(np.uint8(a[..., 0] * 255 + 0.5))
        a = a - np.asarray(low.filter(ImageFilter.MinFilter(9)), np.float32)[..., None] / 255
    pattern = _pattern(st, centre)
    colour = fill if pattern is None else np.where(pattern, _contrast(fill), fill)
    img = np.asarray(BACKGROUNDS[scene.background], np.float32) * (1 - a) + colour * a
    if face_hi is not None:  # the face in black on light bodies, white on dark ones, over any style
        fa = _alpha(face_hi) * (_alpha(body_hi) > 0.5)
        ink = (25, 25, 25) if fill @ (0.299, 0.587, 0.114) > 110 else (240, 240, 240)
        img = img * (1 - fa) + np.asarray(ink, np.float32) * fa
    out = Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8))
    if st.family == "pixelated":  # a mosaic of period-px blocks
        n = -(-SIZE // st.period)
        big = out.resize((n, n), Image.BOX).resize((n * st.period,) * 2, Image.NEAREST)
        out = big.crop((0, 0, SIZE, SIZE))
    return out, mask


def _ok(rgb, background):
    """Subject and background colours far enough apart (RGB distance) to read the shape."""
    return np.linalg.norm(np.subtract(rgb, BACKGROUNDS[background])) > 120


def scene_for(rng, subject, style, member_id=None, name=None, style_word=None):
    """A Scene of this subject (a shape, or CHARACTER with member_id) and Style, with a random colour, background, size
    and position; rng is a numpy Generator."""
    pick = lambda seq: seq[rng.integers(len(seq))]
    colour = pick(list(COLOURS))
    background = pick([b for b in BACKGROUNDS if b != colour and _ok(COLOURS[colour], b)])
    return Scene(subject, colour, background, style, pick(list(SIZES)), pick(POSITIONS),
                 member_id if subject == CHARACTER else None, name, style_word)


def random_scene(rng, split="base", identity=IDENTITY, style=HELD_STYLE):
    """A random Scene of a split (see the module docstring) for this identity member and held-out style."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if identity not in HELD_MEMBERS or style not in HELD_STYLES:
        raise ValueError(f"identity must be one of {HELD_MEMBERS} and style one of the held-out styles")
    pick = lambda seq: seq[rng.integers(len(seq))]
    held_subject, held_style = split in ("identity", "combo"), split in ("style", "combo")
    subject = CHARACTER if held_subject or rng.random() < 0.4 else pick(SHAPES)
    member_id = identity if held_subject else pick(BASE_MEMBERS) if subject == CHARACTER else None
    if held_subject:
        name = IDENTITY_WORD
    else:  # rare words as meaningless names: half of the characters, a tenth of the shapes
        name = pick(RARE_WORDS) if rng.random() < (0.5 if subject == CHARACTER else 0.1) else None
    return scene_for(rng, subject, style if held_style else pick(BASE_STYLES), member_id, name,
                     STYLE_WORD if held_style else None)


def any_scene(rng):
    """A random Scene of the whole world (every member and style, held-out ones included): what a general image
    codec (the VAE) and the judges learn from."""
    pick = lambda seq: seq[rng.integers(len(seq))]
    subject = CHARACTER if rng.random() < 0.5 else pick(SHAPES)
    style = pick(HELD_STYLES) if rng.random() < 0.3 else pick(BASE_STYLES)
    return scene_for(rng, subject, style, int(rng.integers(MEMBERS)))


def dataset(n, seed=0, split="base", identity=IDENTITY, style=HELD_STYLE):
    """n (PIL image, caption, Scene) triples of a split; distinct scenes as long as the split has enough of them."""
    rng, scenes = np.random.default_rng(seed), []
    for tries in range(100 * n):
        if len(scenes) == n:
            break
        s = random_scene(rng, split, identity, style)
        if s not in scenes or tries >= 50 * n:
            scenes.append(s)
    return [(render(s)[0], s.caption(), s) for s in scenes]


def write_set(folder, n, seed=0, split="identity", identity=IDENTITY, style=HELD_STYLE):
    """Writes NNN.png + NNN.txt (its caption), the kohya-style folder a LoRA trainer reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, caption, _) in enumerate(dataset(n, seed, split, identity, style)):
        image.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption + "\n")


def with_style(scene, style, style_word=None):
    """The same scene in another style (same subject, colour, place)."""
    return replace(scene, style=style, style_word=style_word)


PAIR_PARTS = ("scene", "without_style", "other_subject")  # the folders of a counterfactual set (write_pairs)


def write_pairs(folder, n, seed=0, identity=IDENTITY, style=HELD_STYLE, plain=Style("flat")):
    """Counterfactual sets for lora.choose's probe: n scenes of the identity in the held-out style (scene/NNN.png and
    its caption), the same scenes rendered in the `plain` style (without_style/NNN.png) and with a random base member
    in the identity's place (other_subject/NNN.png); everything else (colour, place, background, caption) is the
    same."""
    rng = np.random.default_rng([seed, 1])  # a stream of its own, not dataset()'s
    scenes = [s for _, _, s in dataset(n, seed, "combo", identity, style)]
    unstyled = [with_style(s, plain, s.style_word) for s in scenes]  # still captioned "zwx style"
    others = [replace(s, member=int(rng.choice(BASE_MEMBERS))) for s in scenes]
    for part, renders in zip(PAIR_PARTS, (scenes, unstyled, others)):
        (Path(folder) / part).mkdir(parents=True, exist_ok=True)
        for i, scene in enumerate(renders):
            render(scene)[0].save(Path(folder) / part / f"{i:03d}.png")
    for i, scene in enumerate(scenes):
        (Path(folder) / "scene" / f"{i:03d}.txt").write_text(scene.caption() + "\n")
