"""An Omniglot-like glyph set rendered from the fonts that ship with matplotlib (a stand-in, not Omniglot).

Omniglot (Lake et al. 2015) holds 1,623 handwritten characters of 50 alphabets, 20 drawings each.
This module builds a set with the same shape that needs no download, so the few-shot example
runs anywhere: a Unicode script is an *alphabet*, each of its characters a *class*, and the
instances of a class are the character rendered in the font faces that cover it (DejaVu Sans,
Sans Mono and Serif in their weights and slants, STIX, Computer Modern) under random affine
transforms (rotation, shear, scale, translation).  It is easier and more regular than Omniglot
(typeset, not handwritten; few faces per character in some scripts), so its accuracies are
not comparable with published Omniglot numbers.

Build: for every script below, the characters covered by at least ``min_faces`` faces; a
character whose reference rendering (DejaVu Sans where it has one) nearly equals one already
taken (Latin ``A`` / Greek ``Alpha`` / Cyrillic ``A``) is dropped, so no two classes look alike,
within or across splits; alphabets longer than ``max_per_alphabet`` keep that many characters,
evenly spaced.  Each glyph is centred by its ink's bounding box on a canvas ``supersample``
times the image size (its size kept: ``o`` and ``O`` differ), transformed, and box-averaged down
to ``image_size``.  The result is cached on disk, keyed by every parameter, matplotlib's version
and the font files.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from .fewshot import FewShotDataset, check_dataset

__all__ = ["ALPHABETS", "FACES", "GlyphConfig", "glyph_dataset", "render_glyph", "default_splits"]

# name -> inclusive code point ranges
ALPHABETS: dict[str, tuple[tuple[int, int], ...]] = {
    "Latin": ((0x41, 0x5A), (0x61, 0x7A)),
    "Greek": ((0x391, 0x3A9), (0x3B1, 0x3C9)),
    "Coptic": ((0x3E2, 0x3EF),),
    "Cyrillic": ((0x410, 0x44F),),
    "Armenian": ((0x531, 0x556), (0x561, 0x586)),
    "Hebrew": ((0x5D0, 0x5EA),),
    "Arabic": ((0x621, 0x63A), (0x641, 0x64A)),
    "NKo": ((0x7CA, 0x7EA),),
    "Lao": ((0xE81, 0xEAE),),
    "Georgian": ((0x10D0, 0x10FA),),
    "Georgian_Asomtavruli": ((0x10A0, 0x10C5),),
    "Georgian_Nuskhuri": ((0x2D00, 0x2D25),),
    "Canadian_Syllabics": ((0x1401, 0x166C),),
    "Ogham": ((0x1681, 0x169A),),
    "Tifinagh": ((0x2D30, 0x2D65),),
    "IPA": ((0x250, 0x2AF),),
    "Old_Italic": ((0x10300, 0x1031E),),
    "Lisu": ((0xA4D0, 0xA4F7),),
}

# matplotlib's bundled faces that hold letters (not STIX's size variants or private-use faces,
# not cmex10 / cmsy10, whose ASCII slots hold symbols); the first is the reference face
FACES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmti10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmmi10.ttf",
)

# meta-validation and meta-test alphabets of the default split (the rest is meta-training)
DEFAULT_VAL = ("Hebrew", "Ogham", "Georgian_Asomtavruli")
DEFAULT_TEST = ("Armenian", "Tifinagh", "NKo", "Lisu", "Georgian_Nuskhuri")


class GlyphConfig(NamedTuple):
    """Everything the rendered set depends on (the cache key)."""

    image_size: int = 28
    instances: int = 20
    seed: int = 0
    min_faces: int = 2
    max_per_alphabet: int = 55
    supersample: int = 4
    em: float = 0.6  # font size (em) as a fraction of the canvas side
    rotation: float = 12.0  # degrees, uniform in +-rotation
    shear: float = 0.15  # uniform in +-shear
    scale: tuple = (0.85, 1.1)  # isotropic scale, uniform
    aspect: float = 0.08  # per-axis scale factor uniform in 1 +- aspect
    translate: float = 0.06  # fraction of the side, uniform in +-translate per axis
    duplicate_threshold: float = 0.1  # relative L1 distance below which two characters are one
    alphabets: tuple = ()  # names from ALPHABETS to render (empty: all)


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _no_hinting():
    from matplotlib import ft2font

    flags = getattr(ft2font, "LoadFlags", None)
    return flags.NO_HINTING if flags is not None else ft2font.LOAD_NO_HINTING


def render_glyph(font, codepoint: int, canvas: int, em: float) -> Optional[np.ndarray]:
    """``(canvas, canvas)`` float image in [0, 1] of one character, ink centred; None if blank.

    ``font`` is a :class:`matplotlib.ft2font.FT2Font`; the font size is ``em * canvas`` pixels.
    A glyph larger than the canvas is cropped around its centre.
    """
    font.set_size(em * canvas, 72)
    font.set_text(chr(codepoint), 0.0, flags=_no_hinting())
    font.draw_glyphs_to_bitmap(antialiased=True)
    bitmap = np.asarray(font.get_image(), dtype=float) / 255.0
    rows, cols = np.flatnonzero(bitmap.max(axis=1) > 0.1), np.flatnonzero(bitmap.max(axis=0) > 0.1)
    if rows.size == 0:
        return None
    ink = bitmap[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
    out = np.zeros((canvas, canvas))
    h, w = min(ink.shape[0], canvas), min(ink.shape[1], canvas)
    r0, c0 = (ink.shape[0] - h) // 2, (ink.shape[1] - w) // 2
    top, left = (canvas - h) // 2, (canvas - w) // 2
    out[top: top + h, left: left + w] = ink[r0: r0 + h, c0: c0 + w]
    return out


def _downsample(image: np.ndarray, factor: int) -> np.ndarray:
    n = image.shape[0] // factor
    return image.reshape(n, factor, n, factor).mean(axis=(1, 3))


def _random_affine(image: np.ndarray, rng: np.random.Generator, cfg: GlyphConfig) -> np.ndarray:
    """Rotate, shear, scale and translate about the centre (bilinear interpolation)."""
    from scipy.ndimage import affine_transform

    side = image.shape[0]
    angle = np.deg2rad(rng.uniform(-cfg.rotation, cfg.rotation))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    shear = np.array([[1.0, rng.uniform(-cfg.shear, cfg.shear)], [0.0, 1.0]])
    scale = rng.uniform(*cfg.scale) * np.diag(1.0 + rng.uniform(-cfg.aspect, cfg.aspect, size=2))
    forward = rot @ shear @ scale
    shift = rng.uniform(-cfg.translate, cfg.translate, size=2) * side
    centre = np.full(2, (side - 1) / 2.0)
    inverse = np.linalg.inv(forward)  # output pixel o reads input pixel inverse (o - centre - shift) + centre
    return affine_transform(image, inverse, offset=centre - inverse @ (centre + shift), order=1, mode="constant")


def _candidates(cfg: GlyphConfig):
    """Per alphabet: [(codepoint, [face indices covering it])] with at least ``min_faces`` faces."""
    from matplotlib.ft2font import FT2Font

    font_dir = _font_dir()
    charmaps = [FT2Font(str(font_dir / name)).get_charmap() for name in FACES]
    out = {}
    for alphabet, ranges in ALPHABETS.items():
        if cfg.alphabets and alphabet not in cfg.alphabets:
            continue
        chars = []
        for lo, hi in ranges:
            for cp in range(lo, hi + 1):
                faces = [i for i, cmap in enumerate(charmaps) if cmap.get(cp, 0) != 0]
                if len(faces) >= cfg.min_faces:
                    chars.append((cp, faces))
        out[alphabet] = chars
    return out


def _build(cfg: GlyphConfig) -> tuple[FewShotDataset, np.ndarray]:
    from matplotlib.ft2font import FT2Font

    font_dir = _font_dir()
    fonts = [FT2Font(str(font_dir / name)) for name in FACES]
    canvas = cfg.image_size * cfg.supersample
    renders: dict[tuple[int, int], np.ndarray] = {}

    def render(face, cp):
        if (face, cp) not in renders:
            renders[(face, cp)] = render_glyph(fonts[face], cp, canvas, cfg.em)
        return renders[(face, cp)]

    kept_refs: list[np.ndarray] = []
    classes = []  # (alphabet index, codepoint, faces)
    alphabets = []
    for alphabet, chars in _candidates(cfg).items():
        taken = []
        for cp, faces in chars:
            faces = [f for f in faces if render(f, cp) is not None]
            if len(faces) < cfg.min_faces:
                continue
            ref = _downsample(render(faces[0], cp), cfg.supersample)
            ink = ref.sum()
            if any(np.abs(ref - other).sum() < cfg.duplicate_threshold * 0.5 * (ink + other.sum())
                   for other in kept_refs):
                continue  # a homoglyph of a character already taken
            kept_refs.append(ref)
            taken.append((cp, faces))
        if len(taken) > cfg.max_per_alphabet:
            pick = np.unique(np.round(np.linspace(0, len(taken) - 1, cfg.max_per_alphabet)).astype(int))
            taken = [taken[i] for i in pick]
        if taken:
            alphabets.append(alphabet)
            classes.extend((len(alphabets) - 1, cp, faces) for cp, faces in taken)

    images = np.zeros((len(classes), cfg.instances, cfg.image_size, cfg.image_size), np.uint8)
    face_of = np.zeros((len(classes), cfg.instances), np.int16)
    for k, (_, cp, faces) in enumerate(classes):
        rng = np.random.default_rng([cfg.seed, cp])
        order = np.concatenate([rng.permutation(faces) for _ in range(-(-cfg.instances // len(faces)))])
        for i in range(cfg.instances):
            face = int(order[i])
            warped = _random_affine(render(face, cp), rng, cfg)
            images[k, i] = np.round(255 * np.clip(_downsample(warped, cfg.supersample), 0, 1))
            face_of[k, i] = face
    dataset = FewShotDataset(
        images=images,
        class_names=tuple(f"{alphabets[a]}/U+{cp:04X}" for a, cp, _ in classes),
        alphabets=tuple(alphabets),
        class_alphabet=np.asarray([a for a, _, _ in classes], np.int32),
    )
    return dataset, face_of


def _cache_key(cfg: GlyphConfig) -> str:
    import matplotlib

    font_dir = _font_dir()
    fonts = {name: (font_dir / name).stat().st_size for name in FACES}
    blob = json.dumps({"config": cfg._asdict(), "alphabets": ALPHABETS, "fonts": fonts,
                       "matplotlib": matplotlib.__version__, "format": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cache_dir(cache_dir) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    base = os.environ.get("HIERMETA_CACHE") or str(Path.home() / ".cache" / "hiermeta")
    return Path(base) / "glyphs"


def glyph_dataset(config: Optional[GlyphConfig] = None, *, cache_dir=None, use_cache: bool = True, **overrides) -> FewShotDataset:
    """The rendered glyph set (see the module docstring), from the disk cache when it is there.

    ``config`` or keyword overrides of :class:`GlyphConfig` (``image_size``, ``instances``, ...).
    The cache lives in ``cache_dir``, else ``$HIERMETA_CACHE/glyphs``, else
    ``~/.cache/hiermeta/glyphs``; a file is named by a hash of everything the set depends on.
    """
    cfg = (config or GlyphConfig())._replace(**overrides)
    for name in ("image_size", "instances", "min_faces", "max_per_alphabet", "supersample"):
        value = getattr(cfg, name)
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value}")
    if cfg.image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {cfg.image_size}")
    unknown = sorted(set(cfg.alphabets) - set(ALPHABETS))
    if unknown:
        raise ValueError(f"unknown alphabets {unknown}; choose from {sorted(ALPHABETS)}")
    cfg = cfg._replace(alphabets=tuple(cfg.alphabets), scale=tuple(cfg.scale))
    if not 0 < cfg.em <= 1 or not 0 < cfg.scale[0] <= cfg.scale[1]:
        raise ValueError("em must lie in (0, 1] and scale must satisfy 0 < low <= high")
    path = _cache_dir(cache_dir) / f"glyphs-{_cache_key(cfg)}.npz"
    if use_cache and path.exists():
        with np.load(path, allow_pickle=False) as f:
            dataset = FewShotDataset(f["images"], tuple(f["class_names"].tolist()), tuple(f["alphabets"].tolist()),
                                     f["class_alphabet"])
        check_dataset(dataset)
        return dataset
    dataset, face_of = _build(cfg)
    check_dataset(dataset)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
        np.savez_compressed(tmp, images=dataset.images, class_names=np.asarray(dataset.class_names),
                            alphabets=np.asarray(dataset.alphabets), class_alphabet=dataset.class_alphabet,
                            face=face_of, faces=np.asarray(FACES), config=json.dumps(cfg._asdict()))
        os.replace(tmp, path)
    return dataset


def default_splits(dataset: FewShotDataset) -> dict[str, np.ndarray]:
    """The class-disjoint split by alphabet used by the example (``DEFAULT_VAL``, ``DEFAULT_TEST``)."""
    from .fewshot import split_classes

    return split_classes(dataset, DEFAULT_VAL, DEFAULT_TEST)
