"""``image_folder``: one sub-folder of images per class, loaded into memory as ``[C, H, W]`` tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gradwise.data.bundle import DataBundle
from gradwise.data.common import check_int, make_bundle, split_indices, standardize
from gradwise.data.sources import DATASETS
from gradwise.errors import ConfigError, DataError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def _size(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(image_size, (list, tuple)) and len(image_size) == 2:
        return check_int(image_size[0], "image_size"), check_int(image_size[1], "image_size")
    if isinstance(image_size, (list, tuple)):
        raise ConfigError(
            "data.kwargs.image_size", image_size, "an integer or a (height, width) pair"
        )
    size = check_int(image_size, "image_size")
    return size, size


def _scan(root: Path) -> tuple[list[str], list[Path], list[int], list[str]]:
    """Class names, image files, their labels and notes about skipped folders."""
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    classes, files, labels, notes = [], [], [], []
    for folder in folders:
        images = sorted(
            f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
        )
        if not images:
            notes.append(f"skipped folder {folder.name!r}: no images")
            continue
        files += images
        labels += [len(classes)] * len(images)
        classes.append(folder.name)
    return classes, files, labels, notes


def _read(file: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as image:
            image = image.convert(mode).resize((size[1], size[0]), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read image {file}: {exc}") from None
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


@DATASETS.register("image_folder")
def image_folder(
    path: str,
    image_size: int | tuple[int, int] = 32,
    grayscale: bool = False,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> DataBundle:
    """Images under ``path/<class name>/`` resized to ``image_size``, as ``[C, H, W]`` float tensors.

    Pixels are scaled to [0, 1], then standardised per channel with the train split's statistics;
    the split is stratified by class. Everything is loaded into memory: meant for small sets.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"data.kwargs.path: {root} is not a directory of class folders")
    size = _size(image_size)
    classes, files, labels, notes = _scan(root)
    if len(classes) < 2:
        raise DataError(
            f"{root}: found {len(classes)} class folder(s) with images; expected one sub-folder of images per class "
            f"(at least two), with suffixes {', '.join(sorted(IMAGE_SUFFIXES))}"
        )
    mode = "L" if grayscale else "RGB"
    x = torch.from_numpy(np.stack([_read(f, mode, size) for f in files])).to(torch.float32) / 255.0
    y = torch.as_tensor(labels, dtype=torch.int64)
    train, val = split_indices(len(files), y, val_fraction, seed, stratify=True)
    x_tr, x_va, record = standardize(x[train], x[val] if len(val) else None, per="channel")
    return make_bundle(
        root.name,
        (x_tr, y[train]),
        (x_va, y[val]) if len(val) else None,
        task="binary" if len(classes) == 2 else "multiclass",
        num_classes=len(classes),
        class_names=classes,
        preprocessing={
            "resize": list(size),
            "color": mode,
            "scale": 1 / 255,
            "standardize": record,
        },
        notes=notes,
    )
