"""Images as people have them: a folder of image files, sub-folders as classes.

:func:`load_image_split` reads a folder laid out as torchvision's ``ImageFolder`` (``DIR/cat/
1.png``, ``DIR/dog/2.jpg``; or image files directly in ``DIR``, without labels) with Pillow,
one image at a time into one preallocated array: resized to the model's image size and
normalised with the mean and standard deviation of the model folder's
``preprocessor_config.json`` (:func:`image_preprocessing`). A seeded fraction is held out to
test unless a test folder is given. The result is the :class:`~qtcompress.examples.Split` of
one positional ``(N, C, H, W)`` float32 input (``pixel_values``) that an ``.npz`` with
``x_train`` gives, so the rest of the pipeline is unchanged. A file Pillow cannot read is
refused by name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qtcompress.constants import TEXT_SPLIT_SEED, TEXT_TEST_FRACTION
from qtcompress.errors import ConfigError, FormatError, MissingFileError
from qtcompress.examples import Split

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
"""Files read as images (others in the folder are ignored)."""

# ViT's processor defaults, used when the folder has no preprocessor_config.json.
_DEFAULT_MEAN = (0.5, 0.5, 0.5)
_DEFAULT_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ImagePreprocessing:
    """How an image file becomes a model input.

    Attributes:
        size: ``(height, width)`` every image is resized to (bilinear).
        channels: 3 (RGB) or 1 (grey).
        rescale: Factor from 0..255 pixel values (``1/255``).
        mean: Subtracted per channel after rescaling.
        std: Divides per channel after that.
        source: Where these came from, for the description.
    """

    size: tuple[int, int]
    channels: int
    rescale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    def describe(self) -> str:
        """``"16x16 RGB, mean (0.5, ...) std (0.5, ...) from preprocessor_config.json"``."""
        mode = "RGB" if self.channels == 3 else "grey"
        mean = ", ".join(f"{m:g}" for m in self.mean)
        std = ", ".join(f"{s:g}" for s in self.std)
        return f"{self.size[0]}x{self.size[1]} {mode}, mean ({mean}) std ({std}) {self.source}"


def _size(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int):
        return value, value
    if isinstance(value, Mapping):
        if isinstance(value.get("height"), int) and isinstance(value.get("width"), int):
            return value["height"], value["width"]
        edge = value.get("shortest_edge")
        if isinstance(edge, int):
            return edge, edge
    return None


def image_preprocessing(
    folder: str | os.PathLike[str],
    config: Any,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ImagePreprocessing:
    """The model folder's image preprocessing: its ``preprocessor_config.json``, else defaults.

    Args:
        folder: The model folder.
        config: The model's config (``image_size``, ``num_channels`` where it has them).
        image_size: Square size to resize to instead of the folder's (``--image-size``).
        mean: Per-channel mean instead of the folder's (``--image-mean``).
        std: Per-channel standard deviation instead of the folder's (``--image-std``).

    Returns:
        The preprocessing. Without a preprocessor config: the config's ``image_size`` (else
        224), and ViT's mean and standard deviation 0.5.

    Raises:
        FormatError: ``preprocessor_config.json`` is not a JSON object.
        ConfigError: A mean or standard deviation that does not fit the channels.
    """
    path = Path(folder) / "preprocessor_config.json"
    channels = int(getattr(config, "num_channels", 3) or 3)
    prep: Mapping[str, Any] = {}
    if path.is_file():
        try:
            prep = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise FormatError(f"{str(path)!r} is not JSON ({exc}).") from exc
        if not isinstance(prep, Mapping):
            raise FormatError(f"{str(path)!r} is not a JSON object.")
    size = _size(prep.get("size")) or _size(getattr(config, "image_size", None)) or (224, 224)
    if image_size is not None:
        size = (image_size, image_size)
    normalize = prep.get("do_normalize", True)
    given = {"mean": mean, "std": std}
    mean = (
        tuple(mean)
        if mean is not None
        else tuple(prep.get("image_mean", _DEFAULT_MEAN))
        if normalize
        else (0.0,) * channels
    )
    std = (
        tuple(std)
        if std is not None
        else tuple(prep.get("image_std", _DEFAULT_STD))
        if normalize
        else (1.0,) * channels
    )
    rescale = float(prep.get("rescale_factor", 1 / 255)) if prep.get("do_rescale", True) else 1.0
    if len(mean) != channels or len(std) != channels or not all(s > 0 for s in std):
        where = (
            "--image-mean/--image-std"
            if any(v is not None for v in given.values())
            else repr(str(path))
        )
        raise ConfigError(
            f"{where}: image_mean {list(mean)} and image_std {list(std)} do not fit "
            f"{channels} channels (positive standard deviations)."
        )
    source = "from preprocessor_config.json" if prep else "(defaults: no preprocessor_config.json)"
    if image_size is not None:
        source += ", size from --image-size"
    if any(v is not None for v in given.values()):
        source += ", mean/std from --image-mean/--image-std"
    return ImagePreprocessing(size, channels, rescale, mean, std, source)


def list_images(folder: str | os.PathLike[str]) -> tuple[list[tuple[Path, str | None]], list[str]]:
    """The image files of a folder and their class (sub-folder) names, in sorted order.

    Returns:
        ``([(file, class or None)], classes)``: classes are the sub-folders holding images,
        sorted (``ImageFolder``'s order); files directly in ``folder`` have no class.

    Raises:
        MissingFileError: The folder does not exist.
        ConfigError: It holds no images, or images both directly and in sub-folders.
    """
    root = Path(folder)
    if not root.is_dir():
        raise MissingFileError(f"Image folder {str(root)!r} does not exist.")

    def images(d: Path) -> list[Path]:
        return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    direct = images(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and images(d))
    if direct and classes:
        raise ConfigError(
            f"{str(root)!r} holds images both directly and in sub-folders {classes}; put every "
            "image in its class's sub-folder, or all of them directly in the folder."
        )
    found: list[tuple[Path, str | None]] = [(p, None) for p in direct]
    found += [(p, c) for c in classes for p in images(root / c)]
    if not found:
        raise ConfigError(
            f"{str(root)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}), directly or in "
            "sub-folders."
        )
    return found, classes


def _read(path: Path, prep: ImagePreprocessing) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB" if prep.channels == 3 else "L")
            height, width = prep.size
            image = image.resize((width, height), Image.Resampling.BILINEAR)
            raw = np.asarray(image, dtype=np.float32).reshape(*prep.size, prep.channels)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise FormatError(f"{str(path)!r} is not an image Pillow can read ({exc}).") from exc
    mean, std = np.asarray(prep.mean, np.float32), np.asarray(prep.std, np.float32)
    pixels: np.ndarray = (raw * np.float32(prep.rescale) - mean) / std
    return pixels.transpose(2, 0, 1)


def _load(
    files: Sequence[tuple[Path, str | None]], prep: ImagePreprocessing, progress: bool, what: str
) -> np.ndarray:
    from tqdm.auto import tqdm

    from qtcompress.memory import check_memory

    shape = (len(files), prep.channels, *prep.size)
    check_memory(4 * int(np.prod(shape)), f"reading {what}", "use fewer or smaller images")
    out = np.empty(shape, dtype=np.float32)
    for i, (path, _) in enumerate(tqdm(files, desc=f"reading {what}", disable=not progress)):
        out[i] = _read(path, prep)
    return out


def load_image_split(
    path: str | os.PathLike[str],
    prep: ImagePreprocessing,
    *,
    test_path: str | os.PathLike[str] | None = None,
    test_fraction: float = TEXT_TEST_FRACTION,
    seed: int = TEXT_SPLIT_SEED,
    label2id: Mapping[str, int] | None = None,
    progress: bool = False,
) -> tuple[Split, str]:
    """Read folders of images into a train/test :class:`Split` of one ``(N, C, H, W)`` input.

    Args:
        path: The training images (see :func:`list_images`).
        prep: How each image becomes an input (:func:`image_preprocessing`).
        test_path: A folder of held-out images laid out the same way; default: a seeded
            ``test_fraction`` of ``path`` (at least 2 images).
        test_fraction: The share held out when ``test_path`` is not given.
        seed: Seed of that split.
        label2id: The model's label names (a config's ``label2id``): class sub-folders are
            labels only when every one of them is such a name; otherwise only distillation.
        progress: Show a progress bar while reading.

    Returns:
        The split (float32 inputs, int64 labels or empty tensors) and one line saying what was
        read, how it was preprocessed and split, and whether the sub-folders are labels.

    Raises:
        ConfigError: No images, a bad layout, too few images, a bad fraction.
        FormatError: A file Pillow cannot read (named).
        MissingFileError: A folder does not exist.
    """
    from qtcompress.data.text import held_out
    from qtcompress.io.arrays import check_dataset

    if test_path is None and not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"--test-fraction must be in (0, 1), got {test_fraction!r}.")
    train_files, classes = list_images(path)
    test_files, test_classes = list_images(test_path) if test_path is not None else ([], [])
    every = sorted(set(classes) | set(test_classes))
    names = label2id or {}
    labelled = bool(every) and all(c in names for c in every)
    if test_path is None:
        if len(train_files) < 3:
            raise ConfigError(
                f"{str(path)!r} holds {len(train_files)} images; at least 3 are needed (2 held "
                "out to test, 1 to train), or give --test-data."
            )
        kept, held = held_out(len(train_files), test_fraction, seed)
        train_files, test_files = [train_files[i] for i in kept], [train_files[i] for i in held]
        split = f"{test_fraction:.0%} held out to test, seed {seed}"
    else:
        split = f"test folder {Path(test_path).name}"
    name = Path(path).name
    x_train = _load(train_files, prep, progress, name)
    x_test = _load(test_files, prep, progress, Path(test_path).name if test_path else name)

    def labels(files: Sequence[tuple[Path, str | None]]) -> torch.Tensor:
        if not labelled:
            return torch.empty(0, dtype=torch.int64)
        return torch.tensor([int(names[str(c)]) for _, c in files], dtype=torch.int64)

    y_train, y_test = labels(train_files), labels(test_files)
    check_dataset(
        {"x_train": x_train, "x_test": x_test}
        | ({"y_train": y_train, "y_test": y_test} if labelled else {}),
        source=f"{Path(path).name}/",
    )

    if labelled:
        note = f"labels: the sub-folders {every}, as the model's labels"
    elif every:
        note = f"sub-folders {every} are not the model's labels: distillation only"
    else:
        note = "no labels: distillation only"
    description = (
        f"{name}/: {len(train_files):,} train / {len(test_files):,} test images ({split}); "
        f"{prep.describe()}; {note}"
    )
    return Split(torch.from_numpy(x_train), y_train, torch.from_numpy(x_test), y_test), description
