"""Omniglot (Lake et al. 2015) from its standard directory layout, for users who have the data.

    ROOT/images_background/<alphabet>/<characterNN>/<drawing>.png     (30 alphabets, 964 characters)
    ROOT/images_evaluation/<alphabet>/<characterNN>/<drawing>.png     (20 alphabets, 659 characters)

as unpacked from ``images_background.zip`` / ``images_evaluation.zip`` of
https://github.com/brendenlake/omniglot (hiermeta downloads nothing).  Every character has 20
drawings: 105 x 105 PNGs, black ink on white.  :func:`load_omniglot` returns a
:class:`~hiermeta.models.fewshot.FewShotDataset` with ink high (255), each drawing resized to
``image_size`` (box filter, as the usual 28 x 28 preprocessing); alphabets are named
``"background/<alphabet>"`` and ``"evaluation/<alphabet>"``, so Lake et al.'s split is
:func:`background_evaluation_split`.  Augmenting classes by rotations of 90, 180 and 270 degrees
(the common "augmented Omniglot") is :func:`with_rotations`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .fewshot import FewShotDataset, check_dataset

__all__ = ["SPLITS", "load_omniglot", "background_evaluation_split", "with_rotations"]

SPLITS = ("images_background", "images_evaluation")


def _load_png(path: Path, image_size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        gray = img.convert("L")
        if gray.size != (image_size, image_size):
            gray = gray.resize((image_size, image_size), Image.BOX)
        pixels = np.asarray(gray, dtype=np.uint8)
    return 255 - pixels  # ink (black) high


def load_omniglot(root, image_size: int = 28, splits: Sequence[str] = SPLITS) -> FewShotDataset:
    """Read Omniglot's ``splits`` under ``root`` (see the module docstring).

    Raises:
      ValueError: ``root`` or a split missing, a split without characters, a character without
        PNGs, or characters with different numbers of drawings (all are stacked into one array).
    """
    root = Path(root)
    if int(image_size) != image_size or image_size < 1:
        raise ValueError(f"image_size must be an integer >= 1, got {image_size}")
    if not root.is_dir():
        raise ValueError(f"Omniglot root {root} is not a directory")
    alphabets, class_alphabet, class_names, images = [], [], [], []
    for split in splits:
        split_dir = root / split
        if not split_dir.is_dir():
            raise ValueError(f"{split_dir} not found: expected {root}/{{{', '.join(SPLITS)}}}/<alphabet>/<character>/*.png")
        tag = split.removeprefix("images_")
        found = 0
        for alphabet_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            alphabets.append(f"{tag}/{alphabet_dir.name}")
            for char_dir in sorted(p for p in alphabet_dir.iterdir() if p.is_dir()):
                pngs = sorted(char_dir.glob("*.png"))
                if not pngs:
                    raise ValueError(f"character directory {char_dir} holds no PNG files")
                images.append(np.stack([_load_png(p, int(image_size)) for p in pngs]))
                class_names.append(f"{tag}/{alphabet_dir.name}/{char_dir.name}")
                class_alphabet.append(len(alphabets) - 1)
                found += 1
        if found == 0:
            raise ValueError(f"{split_dir} holds no <alphabet>/<character>/*.png")
    counts = {name: len(drawings) for name, drawings in zip(class_names, images)}
    if len(set(counts.values())) > 1:
        low = min(counts, key=counts.get)
        raise ValueError(
            f"characters hold different numbers of drawings ({min(counts.values())} to {max(counts.values())}; "
            f"e.g. {low} has {counts[low]}); every character needs the same number"
        )
    dataset = FewShotDataset(np.stack(images), tuple(class_names), tuple(alphabets),
                             np.asarray(class_alphabet, np.int32))
    check_dataset(dataset)
    return dataset


def background_evaluation_split(dataset: FewShotDataset, num_val_alphabets: int = 5) -> dict[str, np.ndarray]:
    """Lake et al.'s split: evaluation alphabets for meta-test; the last ``num_val_alphabets``
    background alphabets (in name order) for meta-validation; the other background ones for meta-training."""
    from .fewshot import split_classes

    background = [a for a in dataset.alphabets if a.startswith("background/")]
    test = [a for a in dataset.alphabets if a.startswith("evaluation/")]
    if not 0 <= num_val_alphabets < len(background):
        raise ValueError(f"num_val_alphabets must lie in 0..{len(background) - 1}, got {num_val_alphabets}")
    val = background[len(background) - num_val_alphabets:]
    return split_classes(dataset, val, test)


def with_rotations(dataset: FewShotDataset) -> FewShotDataset:
    """Each class also rotated by 90, 180 and 270 degrees as three new classes of its alphabet
    (class ``k`` rotated by ``r`` quarter turns is class ``r * C + k``)."""
    check_dataset(dataset)
    rotated = [np.rot90(dataset.images, r, axes=(2, 3)) for r in range(4)]
    names = tuple(f"{name}/rot{90 * r}" for r in range(4) for name in dataset.class_names)
    return FewShotDataset(np.ascontiguousarray(np.concatenate(rotated)), names, dataset.alphabets,
                          np.tile(dataset.class_alphabet, 4))
