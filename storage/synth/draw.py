"""Procedurally drawn pedestrians for the synthetic P-VLG benchmark: attributes → pixels + part map.

Consumes a seeded `numpy.random.Generator` and an image size. Produces identity attributes
(`PersonAttrs`, sampled once per identity: hair, hat, upper/lower garment, shoes, bag, with colours from
the named `PALETTE_RGB` so captions can name them) and, per image, a `DrawnImage`: an H x W x 3 uint8
RGB array plus an H x W int8 part map holding the `BODY_PARTS` index of the part that painted each
pixel last (-1: background, bare skin of neck/arms/legs, or a foreground occluder). Parts are painted
in depth order, so the part map is the visible (post-occlusion) mask of every part, disjoint by
construction. Pose, scale, position, view (front/back), background clutter and lighting vary per
image; clothing never does.

Geometry is written in person units: x relative to the body's centre line and y from the top of the
head, both as fractions of the person's height, so one drawing serves every image size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from storage.schemas import BODY_PARTS

HEAD, UPPER, LOWER, FEET, BAG = (BODY_PARTS.index(p) for p in ("head", "upper", "lower", "feet", "bag"))
NO_PART = -1

PALETTE_RGB: dict[str, tuple[int, int, int]] = {
    "black": (28, 28, 30),
    "white": (236, 236, 232),
    "grey": (128, 128, 128),
    "red": (200, 32, 38),
    "blue": (38, 74, 196),
    "green": (40, 140, 62),
    "yellow": (236, 206, 44),
    "orange": (240, 132, 32),
    "pink": (242, 152, 192),
    "purple": (122, 52, 152),
    "brown": (118, 74, 40),
    "beige": (214, 194, 152),
}
COLOURS: tuple[str, ...] = tuple(PALETTE_RGB)
HAIR_RGB: dict[str, tuple[int, int, int]] = {
    "black": (20, 18, 18),
    "brown": (92, 58, 30),
    "blonde": (222, 196, 120),
    "grey": (165, 165, 160),
}
SKIN_RGB: tuple[tuple[int, int, int], ...] = ((246, 208, 180), (224, 172, 130), (180, 128, 90), (120, 80, 56))

UPPER_KINDS = ("t-shirt", "shirt", "jacket", "coat", "sweater", "hoodie", "blouse")
SHORT_SLEEVED = frozenset({"t-shirt", "blouse"})
PATTERNS = ("solid", "striped", "checked", "dotted", "two-tone")
LOWER_KINDS = ("trousers", "jeans", "shorts", "skirt")
SHOE_KINDS = ("sneakers", "boots", "leather shoes")
HAT_KINDS = ("cap", "beanie", "hat")
BAG_KINDS = ("backpack", "handbag", "shoulder bag")
HAIR_STYLES = ("short", "long", "ponytail", "bun")

MIN_PART_PX = 12  # a part with fewer visible pixels is not annotated (nor mentioned)


@dataclass(frozen=True)
class Garment:
    kind: str
    colour: str  # a PALETTE_RGB name
    pattern: str = "solid"  # one of PATTERNS (upper garment only)
    colour2: str | None = None  # second colour of a non-solid pattern


@dataclass(frozen=True)
class PersonAttrs:
    """Everything that stays the same across one identity's images."""

    gender: str  # "man" | "woman"
    age: str  # "young" | "middle-aged"
    skin: int  # index into SKIN_RGB
    hair_colour: str  # a HAIR_RGB name
    hair_style: str  # one of HAIR_STYLES
    hat: Garment | None
    upper: Garment
    lower: Garment
    shoes: Garment
    bag: Garment | None
    bag_side: str | None  # the person's own side ("left" | "right"); on screen it flips with the view

    def signature(self) -> tuple:
        """What must differ between two identities (skin and age alone do not make a new person)."""
        d = asdict(self)
        d.pop("skin")
        d.pop("age")
        return tuple(sorted((k, repr(v)) for k, v in d.items()))

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DrawnImage:
    rgb_hwc: np.ndarray  # H x W x 3 uint8
    part_map_hw: np.ndarray  # H x W int8: BODY_PARTS index of the visible part, or NO_PART
    view: str  # "front" | "back"
    brightness: float  # global light gain applied (1.0 = neutral)


def pick(rng: np.random.Generator, seq, p=None):
    """One element of `seq` (optionally weighted by `p`)."""
    return seq[int(rng.choice(len(seq), p=p))] if p is not None else seq[int(rng.integers(len(seq)))]


def _other_colour(rng: np.random.Generator, *avoid: str) -> str:
    return pick(rng, [c for c in COLOURS if c not in avoid])


def sample_person(rng: np.random.Generator) -> PersonAttrs:
    """Draw one identity's attributes. Adjacent garments get different colours so parts stay separable."""
    man = rng.random() < 0.5
    age = pick(rng, ("young", "young", "middle-aged"))
    hair_colour = pick(rng, tuple(HAIR_RGB))
    hair_style = pick(rng, HAIR_STYLES, p=[0.8, 0.1, 0.1, 0.0] if man else [0.2, 0.4, 0.25, 0.15])
    hat = Garment(pick(rng, HAT_KINDS), pick(rng, COLOURS)) if rng.random() < 0.22 else None
    upper_kinds = UPPER_KINDS[:-1] if man else UPPER_KINDS
    pattern = pick(rng, PATTERNS, p=[0.5, 0.125, 0.125, 0.125, 0.125])
    colour = pick(rng, COLOURS)
    colour2 = None if pattern == "solid" else _other_colour(rng, colour)
    upper = Garment(pick(rng, upper_kinds), colour, pattern, colour2)
    lower_p = [0.4, 0.4, 0.2, 0.0] if man else [0.3, 0.3, 0.15, 0.25]
    if upper.kind == "coat":  # a long coat would hide shorts entirely
        lower_p = [p / (1.0 - lower_p[2]) for p in lower_p[:2]] + [0.0, lower_p[3] / (1.0 - lower_p[2])]
    lower_kind = pick(rng, LOWER_KINDS, p=lower_p)
    if lower_kind == "jeans":
        lower_colour = pick(rng, [c for c in ("blue", "black", "grey") if c != colour])
    else:
        lower_colour = _other_colour(rng, colour)
    lower = Garment(lower_kind, lower_colour)
    shoe_kind = pick(rng, SHOE_KINDS, p=[0.5, 0.2, 0.3])
    shoe_choices = ("black", "brown") if shoe_kind == "leather shoes" else COLOURS
    shoes = Garment(shoe_kind, pick(rng, [c for c in shoe_choices if c != lower_colour]))
    bag, bag_side = None, None
    if rng.random() < 0.55:
        bag = Garment(pick(rng, BAG_KINDS), _other_colour(rng, colour))
        bag_side = pick(rng, ("left", "right"))
    return PersonAttrs(
        gender="man" if man else "woman",
        age=age,
        skin=int(rng.integers(len(SKIN_RGB))),
        hair_colour=hair_colour,
        hair_style=hair_style,
        hat=hat,
        upper=upper,
        lower=lower,
        shoes=shoes,
        bag=bag,
        bag_side=bag_side,
    )


def person_from_json(d: dict) -> PersonAttrs:
    """Inverse of `PersonAttrs.to_json`."""
    fields = dict(d)
    for key in ("hat", "upper", "lower", "shoes", "bag"):
        if fields[key] is not None:
            fields[key] = Garment(**fields[key])
    return PersonAttrs(**fields)


@lru_cache(maxsize=8)
def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:height, 0:width]
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _muted(rng: np.random.Generator) -> np.ndarray:
    # Background colours are pulled toward grey so the saturated palette of the clothes stands out.
    return 0.55 * rng.uniform(30, 225, 3) + 0.45 * rng.uniform(90, 170)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Street-like clutter: a wall/sky gradient, a ground plane, rectangles, lines and blobs."""
    horizon = int(rng.uniform(0.45, 0.8) * height)
    t = np.linspace(0.0, 1.0, height)[:, None]
    c0, c1, ground = _muted(rng), _muted(rng), _muted(rng)
    rows = c0 * (1 - t) + c1 * t
    rows[horizon:] = ground * (1.0 - 0.25 * (t[horizon:] - t[horizon]))
    img = Image.fromarray(np.broadcast_to(rows[:, None, :], (height, width, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 9))):
        x0 = rng.uniform(-0.3, 1.0) * width
        y0 = rng.uniform(0.0, 0.9) * horizon
        x1 = x0 + rng.uniform(0.1, 0.6) * width
        y1 = min(y0 + rng.uniform(0.05, 0.5) * height, height - 1)
        draw.rectangle([x0, y0, x1, y1], fill=tuple(int(v) for v in _muted(rng)))
    for _ in range(int(rng.integers(1, 6))):
        pts = [(rng.uniform(0, width), rng.uniform(0, height)) for _ in range(2)]
        draw.line(pts, fill=tuple(int(v) for v in _muted(rng)), width=int(rng.integers(1, 4)))
    for _ in range(int(rng.integers(0, 3))):
        x, y, r = rng.uniform(0, width), rng.uniform(0, horizon), rng.uniform(0.05, 0.2) * width
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in _muted(rng)))
    return np.asarray(img, dtype=np.float32).copy()


class _Painter:
    """Paints shapes onto the RGB canvas and the part map in depth order (later shapes occlude)."""

    def __init__(self, rgb: np.ndarray, rng: np.random.Generator, cx: float, top: float, hp: float):
        self.rgb = rgb
        self.rng = rng
        self.height, self.width = rgb.shape[:2]
        self.part = np.full((self.height, self.width), NO_PART, dtype=np.int8)
        self.cx, self.top, self.hp = cx, top, hp

    def pt(self, fx: float, fy: float) -> tuple[float, float]:
        return (self.cx + fx * self.hp, self.top + fy * self.hp)

    def box(self, fx0: float, fy0: float, fx1: float, fy1: float) -> list[float]:
        (x0, y0), (x1, y1) = self.pt(fx0, fy0), self.pt(fx1, fy1)
        return [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]

    def limb(self, p0: tuple, p1: tuple, w0: float, w1: float) -> list[tuple[float, float]]:
        """A quadrilateral from person-unit point p0 to p1 with end widths w0, w1."""
        (x0, y0), (x1, y1) = self.pt(*p0), self.pt(*p1)
        dx, dy = x1 - x0, y1 - y0
        norm = max(np.hypot(dx, dy), 1e-6)
        nx, ny = -dy / norm * self.hp / 2, dx / norm * self.hp / 2
        return [
            (x0 + nx * w0, y0 + ny * w0),
            (x1 + nx * w1, y1 + ny * w1),
            (x1 - nx * w1, y1 - ny * w1),
            (x0 - nx * w0, y0 - ny * w0),
        ]

    def tone(self, rgb: tuple[int, int, int]) -> np.ndarray:
        # Small per-image shade jitter: the same garment is never exactly the same RGB twice.
        return np.clip(np.asarray(rgb, np.float32) + self.rng.normal(0.0, 6.0, 3), 0, 255)

    def paint(self, shapes: list[tuple], colour: np.ndarray | tuple, part: int, pattern=None) -> None:
        """shapes: ("poly", pts) | ("ellipse", box) | ("rect", box) | ("chord", box, a0, a1) | ("line", pts, w)."""
        layer = Image.new("L", (self.width, self.height), 0)
        draw = ImageDraw.Draw(layer)
        for shape in shapes:
            kind = shape[0]
            if kind == "poly":
                draw.polygon(shape[1], fill=255)
            elif kind == "ellipse":
                draw.ellipse(shape[1], fill=255)
            elif kind == "rect":
                draw.rectangle(shape[1], fill=255)
            elif kind == "chord":
                draw.chord(shape[1], shape[2], shape[3], fill=255)
            else:
                draw.line(shape[1], fill=255, width=max(1, int(round(shape[2] * self.hp))))
        mask = np.asarray(layer) > 0
        if pattern is None:
            self.rgb[mask] = colour
        else:
            yy, xx = _grid(self.height, self.width)
            self.rgb[mask] = pattern(yy[mask], xx[mask])
        self.part[mask] = part


def _pattern_fn(painter: _Painter, garment: Garment):
    """Per-pixel colours of a patterned garment, anchored to the person so the pattern moves with them."""
    c1 = painter.tone(PALETTE_RGB[garment.colour])
    if garment.pattern == "solid":
        return None
    c2 = painter.tone(PALETTE_RGB[garment.colour2])
    top, hp, cx = painter.top, painter.hp, painter.cx

    def fill(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        if garment.pattern == "striped":
            period = max(3, round(0.022 * hp))
            second = ((ys - top) // period).astype(int) % 2 == 1
        elif garment.pattern == "checked":
            period = max(3, round(0.03 * hp))
            second = (((ys - top) // period).astype(int) + ((xs - cx) // period).astype(int)) % 2 == 1
        elif garment.pattern == "dotted":
            period = max(5, round(0.04 * hp))
            dy, dx = (ys - top) % period - period / 2, (xs - cx) % period - period / 2
            second = dy * dy + dx * dx < (0.28 * period) ** 2
        else:  # two-tone: colour on top, colour2 below the chest line
            second = ys >= top + 0.34 * hp
        return np.where(second[:, None], c2, c1)

    return fill


def draw_image(attrs: PersonAttrs, rng: np.random.Generator, width: int, height: int) -> DrawnImage:
    """One image of `attrs`: random view, pose, scale, position, background and lighting."""
    view = "front" if rng.random() < 0.6 else "back"
    front = view == "front"
    hp = rng.uniform(0.74, 0.9) * min(height, 2.0 * width)  # person height, pixels
    half_span = 0.23 * hp
    cx = rng.uniform(half_span + 1, width - half_span - 1) if width > 2 * half_span + 2 else width / 2
    top = rng.uniform(0.035 * hp, max(0.035 * hp, height - 1.0 * hp - 1))
    pa = _Painter(_background(rng, width, height), rng, cx, top, hp)

    man = attrs.gender == "man"
    sw, ww = (0.105, 0.082) if man else (0.092, 0.075)  # half widths: shoulders, waist
    skin = pa.tone(SKIN_RGB[attrs.skin])
    hair = pa.tone(HAIR_RGB[attrs.hair_colour])
    upper_fill = _pattern_fn(pa, attrs.upper)
    upper_c = pa.tone(PALETTE_RGB[attrs.upper.colour])
    bag = attrs.bag
    bag_c = pa.tone(PALETTE_RGB[bag.colour]) if bag else None
    # The person's left is on the image right when they face the camera.
    bag_sx = (1.0 if (attrs.bag_side == "left") == front else -1.0) if bag else 0.0
    hx = rng.uniform(-0.008, 0.008)
    hy, rx, ry = 0.078, 0.05, 0.066  # head centre y, radii

    # Pose: arm spread and stride per side (sx = -1 image left, +1 image right).
    arms, legs = {}, {}
    for sx in (-1.0, 1.0):
        theta = (
            rng.uniform(0.12, 0.2)
            if bag and bag.kind == "handbag" and sx == bag_sx
            else rng.uniform(0.06, 0.26)
        )
        joint = (sx * (sw - 0.022), 0.195)
        arms[sx] = (joint, (joint[0] + sx * np.sin(theta) * 0.31, joint[1] + np.cos(theta) * 0.31))
        hip = (sx * 0.043, 0.53)
        legs[sx] = (hip, (sx * (0.043 + rng.uniform(-0.005, 0.045)), 0.935))

    # Hair and backpack that sit behind the body in a front view
    if front and attrs.hair_style == "long":
        pa.paint([("rect", pa.box(hx - 0.062, 0.06, hx + 0.062, 0.29))], hair, HEAD)
    if front and attrs.hair_style == "ponytail":
        side = 1.0 if rng.random() < 0.5 else -1.0
        pa.paint([("ellipse", pa.box(hx + side * 0.035, 0.05, hx + side * 0.075, 0.16))], hair, HEAD)
    if front and bag and bag.kind == "backpack":
        pa.paint([("rect", pa.box(-sw - 0.032, 0.2, sw + 0.032, 0.47))], bag_c, BAG)

    # Legs, lower garment, shoes
    lower = attrs.lower
    lower_c = pa.tone(PALETTE_RGB[lower.colour])
    if lower.kind in ("shorts", "skirt"):
        pa.paint([("poly", pa.limb(h, a, 0.058, 0.044)) for h, a in legs.values()], skin, NO_PART)
    pelvis = (
        "poly",
        [pa.pt(-ww, 0.48), pa.pt(ww, 0.48), pa.pt(ww + 0.004, 0.585), pa.pt(-ww - 0.004, 0.585)],
    )
    if lower.kind == "skirt":
        pa.paint(
            [("poly", [pa.pt(-ww, 0.48), pa.pt(ww, 0.48), pa.pt(ww + 0.06, 0.73), pa.pt(-ww - 0.06, 0.73)])],
            lower_c,
            LOWER,
        )
    elif lower.kind == "shorts":
        knees = {
            sx: (h[0] + (a[0] - h[0]) * 0.34, h[1] + (a[1] - h[1]) * 0.34) for sx, (h, a) in legs.items()
        }
        pa.paint(
            [pelvis] + [("poly", pa.limb(legs[sx][0], knees[sx], 0.092, 0.085)) for sx in legs],
            lower_c,
            LOWER,
        )
    else:
        pa.paint([pelvis] + [("poly", pa.limb(h, a, 0.088, 0.062)) for h, a in legs.values()], lower_c, LOWER)
    shoe_c = pa.tone(PALETTE_RGB[attrs.shoes.colour])
    shoes = []
    for sx, (_, (ax, _)) in legs.items():
        toe = ax + sx * 0.007
        if attrs.shoes.kind == "boots":
            shoes += [
                ("rect", pa.box(ax - 0.034, 0.815, ax + 0.034, 0.96)),
                ("ellipse", pa.box(toe - 0.038, 0.935, toe + 0.038, 0.995)),
            ]
        else:
            y0 = 0.93 if attrs.shoes.kind == "leather shoes" else 0.922
            shoes.append(("ellipse", pa.box(toe - 0.036, y0, toe + 0.036, 0.992)))
    pa.paint(shoes, shoe_c, FEET)

    # Neck, torso, backpack straps, arms
    pa.paint([("rect", pa.box(-0.022, 0.12, 0.022, 0.185))], skin, NO_PART)
    shoulders = [pa.pt(-sw, 0.205), pa.pt(-sw + 0.028, 0.168), pa.pt(sw - 0.028, 0.168), pa.pt(sw, 0.205)]
    if attrs.upper.kind == "coat":
        hem = [
            pa.pt(ww + 0.01, 0.5),
            pa.pt(ww + 0.03, 0.685),
            pa.pt(-ww - 0.03, 0.685),
            pa.pt(-ww - 0.01, 0.5),
        ]
    else:
        hem = [pa.pt(ww + 0.004, 0.505), pa.pt(-ww - 0.004, 0.505)]
    torso = [("poly", shoulders + hem)]
    if attrs.upper.kind == "hoodie" and not front:
        torso.append(("ellipse", pa.box(-0.055, 0.15, 0.055, 0.23)))
    pa.paint(torso, upper_c, UPPER, upper_fill)
    if front and bag and bag.kind == "backpack":
        straps = [
            ("poly", pa.limb((sx * (sw - 0.035), 0.172), (sx * (sw - 0.045), 0.4), 0.022, 0.022))
            for sx in (-1, 1)
        ]
        pa.paint(straps, bag_c, BAG)
    short = attrs.upper.kind in SHORT_SLEEVED
    if short:
        pa.paint([("poly", pa.limb(j, e, 0.048, 0.04)) for j, e in arms.values()], skin, NO_PART)
        elbows = {
            sx: (j[0] + (e[0] - j[0]) * 0.38, j[1] + (e[1] - j[1]) * 0.38) for sx, (j, e) in arms.items()
        }
        sleeves = [("poly", pa.limb(arms[sx][0], elbows[sx], 0.07, 0.062)) for sx in arms]
    else:
        sleeves = [("poly", pa.limb(j, e, 0.062, 0.048)) for j, e in arms.values()]
    pa.paint(sleeves, upper_c, UPPER, upper_fill)
    pa.paint(
        [
            ("ellipse", pa.box(e[0] - 0.024, e[1] - 0.024, e[0] + 0.024, e[1] + 0.024))
            for _, e in arms.values()
        ],
        skin,
        NO_PART,
    )

    # Head: hair, face (front only), hat
    if attrs.hair_style == "bun":
        by = 0.012 if front else 0.05
        pa.paint([("ellipse", pa.box(hx - 0.024, by - 0.024, hx + 0.024, by + 0.024))], hair, HEAD)
    if not front and attrs.hair_style == "long":
        pa.paint([("rect", pa.box(hx - 0.058, 0.08, hx + 0.058, 0.3))], hair, HEAD)
    pa.paint(
        [("ellipse", pa.box(hx - rx - 0.006, hy - ry - 0.006, hx + rx + 0.006, hy + ry - 0.01))], hair, HEAD
    )
    if front:
        pa.paint(
            [("ellipse", pa.box(hx - rx + 0.004, hy - ry + 0.024, hx + rx - 0.004, hy + ry + 0.002))],
            skin,
            HEAD,
        )
        eyes = [
            ("ellipse", pa.box(hx + s * 0.018 - 0.006, 0.079, hx + s * 0.018 + 0.006, 0.087)) for s in (-1, 1)
        ]
        pa.paint(eyes, pa.tone((40, 30, 30)), HEAD)
    elif attrs.hair_style == "ponytail":
        pa.paint([("ellipse", pa.box(hx - 0.022, 0.1, hx + 0.022, 0.25))], hair, HEAD)
    if attrs.hat:
        hat_c = pa.tone(PALETTE_RGB[attrs.hat.colour])
        if attrs.hat.kind == "cap":
            shapes = [
                ("chord", pa.box(hx - rx - 0.008, hy - ry - 0.012, hx + rx + 0.008, hy + ry * 0.5), 180, 360)
            ]
            if front:
                shapes.append(("ellipse", pa.box(hx - rx - 0.02, 0.05, hx + rx + 0.02, 0.068)))
        elif attrs.hat.kind == "beanie":
            shapes = [
                ("chord", pa.box(hx - rx - 0.01, hy - ry - 0.016, hx + rx + 0.01, hy + ry * 0.35), 180, 360),
                ("rect", pa.box(hx - rx - 0.01, 0.05, hx + rx + 0.01, 0.064)),
            ]
        else:
            shapes = [
                ("ellipse", pa.box(hx - rx - 0.04, 0.035, hx + rx + 0.04, 0.06)),
                ("rect", pa.box(hx - rx + 0.005, -0.02, hx + rx - 0.005, 0.05)),
            ]
        pa.paint(shapes, hat_c, HEAD)

    # Bags in front of the body
    if bag and bag.kind == "backpack" and not front:
        pa.paint([("rect", pa.box(-sw + 0.012, 0.2, sw - 0.012, 0.47))], bag_c, BAG)
        pa.paint([("rect", pa.box(-sw + 0.035, 0.34, sw - 0.035, 0.45))], bag_c * 0.8, BAG)
    elif bag and bag.kind == "handbag":
        ex, ey = arms[bag_sx][1]
        handle = ("line", [pa.pt(ex - 0.03, ey + 0.035), pa.pt(ex, ey), pa.pt(ex + 0.03, ey + 0.035)], 0.008)
        pa.paint([handle, ("rect", pa.box(ex - 0.05, ey + 0.03, ex + 0.05, ey + 0.12))], bag_c, BAG)
    elif bag and bag.kind == "shoulder bag":
        bx = bag_sx * (ww + 0.06)
        strap = ("line", [pa.pt(-bag_sx * (sw - 0.03), 0.18), pa.pt(bx, 0.445)], 0.014)
        pa.paint([strap, ("rect", pa.box(bx - 0.045, 0.44, bx + 0.045, 0.55))], bag_c, BAG)

    # An occasional foreground pole: occlusion that the masks must respect
    if rng.random() < 0.12:
        px = cx + rng.uniform(-0.15, 0.15) * hp
        pa.paint([("rect", [px, 0, px + 0.03 * hp, height])], _muted(rng), NO_PART)

    # Lighting: global gain, a colour cast and a side-to-side shading ramp
    gain = float(rng.uniform(0.78, 1.18))
    ramp = 1.0 + rng.uniform(-0.18, 0.18) * (np.arange(width, dtype=np.float32) / width - 0.5)
    lit = pa.rgb * (gain * ramp)[None, :, None] + rng.normal(0.0, 5.0, 3).astype(np.float32)
    rgb = np.clip(lit, 0, 255).astype(np.uint8)
    return DrawnImage(rgb_hwc=rgb, part_map_hw=pa.part, view=view, brightness=gain)
