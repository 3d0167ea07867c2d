"""A synthetic stand-in for CUB-200-2011, in the exact CUB layout, so everything runs offline.

Each class is a unique (shape, two-colour palette, texture) combination; instances vary in
rotation, scale, position, background, distractor blobs, brightness and pixel noise.
``make_digits_cub`` writes scikit-learn's real handwritten digits in the same layout.
``triplet.data.layout`` writes the folders and packs them into a ``CUB_200_2011.tgz`` look-alike.
"""
import functools
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from triplet.data.layout import JPEG_QUALITY, write_cub
from triplet.machine import process_pool, usable_cores

SHAPES = ("Circle", "Square", "Triangle", "Star", "Cross", "Ring", "Diamond", "Crescent")
TEXTURES = ("Plain", "Stripes", "Dots", "Checks", "Gradient")
COLOURS = {"Red": (200, 30, 30), "Yellow": (240, 210, 40), "Blue": (30, 60, 200),
           "White": (240, 240, 240), "Green": (30, 150, 50), "Black": (20, 20, 20),
           "Purple": (120, 40, 160), "Orange": (245, 130, 20), "Cyan": (40, 200, 210),
           "Brown": (120, 70, 30), "Pink": (240, 120, 180)}
# (fill, pattern): the two differ in luminance too, so textures survive in grayscale images
PALETTES = (("Red", "Yellow"), ("Blue", "White"), ("Green", "Black"), ("Purple", "Orange"),
            ("Black", "White"), ("Cyan", "Brown"), ("Orange", "Blue"), ("Yellow", "Purple"),
            ("Pink", "Blue"), ("White", "Red"))
MAX_CLASSES = len(SHAPES) * len(TEXTURES) * len(PALETTES)  # 400


def class_spec(k):
    """(shape, palette, texture) of 0-based class ``k``; a bijection on range(MAX_CLASSES).

    Consecutive classes differ in shape, texture and palette at once (8 and 5 are coprime).
    """
    j, r = divmod(k, len(SHAPES) * len(TEXTURES))
    return SHAPES[r % len(SHAPES)], PALETTES[(j + r) % len(PALETTES)], TEXTURES[r % len(TEXTURES)]


def class_name(k):
    shape, (fill, pattern), texture = class_spec(k)
    return f"Synthetic_{shape}_{fill}_{pattern}_{texture}"


def image_shape(image_size):
    """(width, height) of every image: CUB's typical 4:3 landscape, e.g. 500 -> (500, 375)."""
    return image_size, max(16, round(image_size * 3 / 4))


def _gauge(shape, u, v):
    """A gauge function of the shape in object units: <= 1 inside, growing outwards."""
    au, av, r = np.abs(u), np.abs(v), np.hypot(u, v)
    if shape == "Circle":
        return r
    if shape == "Square":
        return np.maximum(au, av) / 0.7
    if shape == "Triangle":
        angles = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return np.max([u * np.cos(a) + v * np.sin(a) for a in angles], axis=0) / 0.5
    if shape == "Star":
        phase = (np.arctan2(v, u) * 5 / (2 * np.pi)) % 1.0
        return r / (0.42 + 0.58 * np.abs(2 * phase - 1))
    if shape == "Cross":
        return np.minimum(np.maximum(au / 0.32, av / 0.95), np.maximum(au / 0.95, av / 0.32))
    if shape == "Ring":
        return np.abs(r - 0.72) / 0.28
    if shape == "Diamond":
        return au / 0.55 + av
    if shape == "Crescent":
        return np.maximum(r, 0.78 / np.maximum(np.hypot(u - 0.42, v), 1e-6))
    raise ValueError(f"unknown shape {shape!r}")


def _pattern(texture, u, v, f, px):
    """Weight of the pattern colour (0..1) at object coordinates; ``px`` = pixels per unit."""
    if texture == "Plain":  # pattern colour as an outline
        t = (f - 0.75) * 3 * px
    elif texture == "Stripes":
        t = np.sin(2 * np.pi * u / 0.6) * 0.6 * px / (2 * np.pi)
    elif texture == "Dots":
        du, dv = (u / 0.6 + 0.5) % 1 - 0.5, (v / 0.6 + 0.5) % 1 - 0.5
        t = (0.2 - 0.6 * np.hypot(du, dv)) * px
    elif texture == "Checks":
        t = np.sin(np.pi * u / 0.55) * np.sin(np.pi * v / 0.55) * 0.55 * px / np.pi
    elif texture == "Gradient":
        return np.clip((u + 0.9) / 1.8, 0, 1)
    else:
        raise ValueError(f"unknown texture {texture!r}")
    return np.clip(t + 0.5, 0, 1)


def _background(rng, width, height):
    """Soft random background: blotchy low-frequency colour, blobs and twigs, then blurred.

    Drawn at most ~128 pixels high and scaled up: it is blurred anyway, and this is fast.
    """
    factor = max(1, min(width, height) // 96)
    w, h = -(-width // factor), -(-height // factor)
    base = rng.uniform(0, 255, 3)
    small = base + rng.normal(0, 50, (3, 4, 3))
    small += (small.mean(axis=2, keepdims=True) - small) * rng.uniform(0, 0.6)  # desaturate
    small = np.clip(small, 0, 255).astype(np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    draw, s = ImageDraw.Draw(img), min(w, h)
    named = list(COLOURS.values())
    for _ in range(rng.integers(2, 6)):  # distractor blobs, colours not tied to any class
        c = named[rng.integers(len(named))] if rng.random() < 0.5 else rng.uniform(0, 255, 3)
        c = tuple(int(x) for x in np.clip(np.asarray(c) + rng.normal(0, 20, 3), 0, 255))
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(0.04, 0.16, 2) * s
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=c)
    for _ in range(rng.integers(0, 4)):  # twigs
        c = tuple(int(x) for x in rng.uniform(0, 200, 3))
        pts = [float(p) for p in rng.uniform(0, 1, 4) * [w, h, w, h]]
        draw.line(pts, fill=c, width=max(1, int(rng.uniform(0.01, 0.03) * s)))
    img = img.filter(ImageFilter.GaussianBlur(radius=max(0.5, 0.015 * s)))
    return img if factor == 1 else img.resize((width, height), Image.BILINEAR)


def render(k, rng, image_size):
    """One image of class ``k`` as (PIL RGB image, (x, y, width, height) of the object)."""
    shape, (fill, pattern), texture = class_spec(k)
    w, h = image_shape(image_size)
    img = np.asarray(_background(rng, w, h), dtype=np.float32)
    radius = rng.uniform(0.27, 0.45) * min(w, h)  # pixels per object unit; object fits r <= 1
    cx = rng.uniform(radius + 1, w - radius - 1)
    cy = rng.uniform(radius + 1, h - radius - 1)
    theta = rng.uniform(-np.pi / 4, np.pi / 4)
    squash = rng.uniform(0.85, 1.0)  # mild foreshortening; the object stays inside r <= 1
    x0, y0 = max(0, int(cx - radius) - 1), max(0, int(cy - radius) - 1)  # the object's window
    x1, y1 = min(w, int(cx + radius) + 2), min(h, int(cy + radius) + 2)
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = (xs + 0.5 - cx) / radius, (ys + 0.5 - cy) / radius
    u = (np.cos(theta) * dx + np.sin(theta) * dy) / squash
    v = -np.sin(theta) * dx + np.cos(theta) * dy
    f = _gauge(shape, u, v)
    alpha = np.clip((1 - f) * radius * 0.8 + 0.5, 0, 1)[..., None]
    t = _pattern(texture, u, v, f, radius)[..., None]
    c1, c2 = (np.float32(COLOURS[c] + rng.normal(0, 15, 3)) for c in (fill, pattern))
    lx, ly = rng.uniform(-0.2, 0.2, 2)  # directional shading across the object
    obj = (c1 * (1 - t) + c2 * t) * (1 + lx * dx + ly * dy)[..., None]
    img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - alpha) + obj * alpha
    # pixel noise, uniform with a standard deviation of 2..10 (cheaper than normal at 500 px)
    noise = (rng.random(img.shape, dtype=np.float32) - 0.5) * (rng.uniform(2, 10) * 12 ** 0.5)
    img = img * rng.uniform(0.7, 1.3) + noise
    rows, cols = np.nonzero(alpha[..., 0] >= 0.5)
    box = (x0 + int(cols.min()), y0 + int(rows.min()), int(cols.max() - cols.min() + 1),
           int(rows.max() - rows.min() + 1))
    return Image.fromarray((np.clip(img, 0, 255) + 0.5).astype(np.uint8)), box


def _check_args(classes, per_class, image_size, grayscale_fraction, train_fraction):
    if not 2 <= classes <= MAX_CLASSES:
        raise ValueError(f"classes must be between 2 and {MAX_CLASSES}, got {classes}")
    if per_class < 2:
        raise ValueError(f"per_class must be at least 2 (one train, one test), got {per_class}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
    if not 0.0 <= grayscale_fraction <= 1.0:
        raise ValueError(f"grayscale_fraction must be in [0, 1], got {grayscale_fraction}")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")


def _render_jpeg(seed, k, i, image_size, gray):
    """One image as the JPEG bytes write_cub stores, and its box: a pure function of its
    arguments, so any process can draw it and the set is the same with any number of them."""
    img, box = render(k, np.random.default_rng([seed, k, i]), image_size)
    buffer = io.BytesIO()
    (img.convert("L") if gray else img).save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue(), box


def make_synthetic_cub(data_dir, classes=12, per_class=10, image_size=64, seed=0,
                       grayscale_fraction=0.05, train_fraction=0.5, processes=0):
    """Write ``data_dir/CUB_200_2011`` (CUB layout, JPEGs) and return its path.

    ``processes``: drawing processes; 0 this process alone, -1 one per usable core. A CUB-size set
    (12,000 images at 500 px) takes minutes in one process, which ``make gpu-check`` cannot spare.
    """
    _check_args(classes, per_class, image_size, grayscale_fraction, train_fraction)
    rng = np.random.default_rng(seed)
    n = classes * per_class
    n_gray = round(n * grayscale_fraction)
    if grayscale_fraction > 0 and n >= 20:
        n_gray = max(n_gray, 1)
    gray = set(rng.choice(n, size=n_gray, replace=False).tolist())
    min_side = 2 if per_class >= 4 else 1
    n_train = min(max(round(per_class * train_fraction), min_side), per_class - min_side)
    train = [set(rng.permutation(per_class)[:n_train].tolist()) for _ in range(classes)]
    tasks = [(k, i) for k in range(classes) for i in range(per_class)]
    if processes < 0:
        processes = usable_cores()

    def items(pool_map):
        rendered = pool_map(_render_jpeg, *zip(*[(seed, k, i, image_size, k * per_class + i in gray)
                                                 for k, i in tasks]))
        for (k, i), (jpeg, box) in zip(tasks, rendered):
            yield k, i, jpeg, i in train[k], box

    readme = ["Made by triplet.data.synthetic.make_synthetic_cub(classes={}, per_class={}, image_size={}, "
              "seed={}, grayscale_fraction={}, train_fraction={}).".format(
                  classes, per_class, image_size, seed, grayscale_fraction, train_fraction),
              "Same layout as CUB_200_2011 (no attributes/ or parts/). Each class is a shape, a "
              "two-colour palette and a texture; the box is the drawn object's extent."]
    names = [class_name(k) for k in range(classes)]
    if processes <= 1:
        return write_cub(data_dir, names, items(map), readme)
    with process_pool(processes) as pool:
        return write_cub(data_dir, names, items(functools.partial(pool.map, chunksize=16)), readme)


def make_digits_cub(data_dir, image_size=32, seed=0, train_fraction=0.5):
    """scikit-learn's 1,797 real handwritten digits (8x8 scans, 10 classes) in the CUB layout.

    Real images that ship with a package: the offline stand-in for real-photo checks (bf16 versus
    fp32, say) where CUB cannot be downloaded.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    names = [f"Digit_{d}" for d in range(10)]

    def items():
        for k in range(10):
            members = np.flatnonzero(digits.target == k)
            train = set(rng.permutation(len(members))[:round(len(members) * train_fraction)].tolist())
            for i, j in enumerate(members):
                pixels = (255 - digits.images[j] * 255 / 16).astype(np.uint8)  # dark ink on white
                img = Image.fromarray(pixels, "L").resize((image_size, image_size), Image.Resampling.BILINEAR)
                yield k, i, img, i in train, (0.0, 0.0, float(image_size), float(image_size))

    return write_cub(data_dir, names, items(), ["Made by triplet.data.synthetic.make_digits_cub: scikit-learn's "
                                                 "handwritten digits (real 8x8 scans), upscaled."])
