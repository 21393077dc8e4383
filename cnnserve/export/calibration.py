"""Calibration and verification inputs for the int8 and fp16 variants.

Every image goes through `cnnserve.preprocess` with the model's own
parameters, as the server's Classify does, so the activation ranges that
calibration measures are those the served model sees. Three sources:

- LeNet-5: the training split of its dataset (never the held-out split, which
  measures the accuracy before and after);
- `--calibration-dir`: real JPEG/PNG images, some held out for verification;
- otherwise seeded synthetic images, smooth random colour fields pushed through
  the same resize, crop and normalisation. They fit the ranges of real photos
  only roughly; export.json says when they were used.

No torch here: the CLI checks `--calibration-dir` before importing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cnnserve.export.errors import ExportError
from cnnserve.preprocess import PreprocessParams, preprocess

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# The parity check runs batches of 1, 2 and 7 (onnx.VERIFY_BATCHES).
MIN_IMAGES = 7
DEFAULT_SIZE = {"digits": 512, "images": 128}
SYNTHETIC_VERIFY = 32
MAX_VERIFY = 64


@dataclass(frozen=True)
class CalibrationSet:
    """Inputs to calibrate on, and inputs to compare the variant with fp32 on."""

    source: str  # "training data", "images" or "synthetic"
    detail: str
    calibrate: np.ndarray  # float32 NCHW, preprocessed
    verify: np.ndarray
    verify_labels: np.ndarray | None  # for an accuracy figure (LeNet-5)
    verify_detail: str
    held_out: bool  # whether `verify` is disjoint from `calibrate`

    def to_json(self) -> dict[str, object]:
        return {"source": self.source, "detail": self.detail, "size": len(self.calibrate)}

    def verification_json(self) -> dict[str, object]:
        return {"detail": self.verify_detail, "size": len(self.verify), "held_out": self.held_out}


def image_files(directory: Path) -> list[Path]:
    """The JPEG and PNG files under `directory` (recursively, as ImageNet's class folders)."""
    return sorted(
        p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


def check_calibration_dir(directory: Path) -> None:
    """Fail early, before torch is imported, on a missing or too small image folder."""
    if not directory.is_dir():
        raise ExportError(f"--calibration-dir {directory} is not a directory")
    count = len(image_files(directory))
    if count < MIN_IMAGES:
        raise ExportError(
            f"--calibration-dir {directory} holds {count} JPEG/PNG image(s); give at least "
            f"{MIN_IMAGES} (verification runs a batch of {MIN_IMAGES})"
        )


def from_training(
    train_x: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    dataset: str,
    size: int | None,
    seed: int,
) -> CalibrationSet:
    """A seeded sample of the training images (`size` 0: none, for fp16); the held-out
    split verifies."""
    size = min(DEFAULT_SIZE["digits"] if size is None else size, len(train_x))
    chosen = np.sort(np.random.default_rng(seed).choice(len(train_x), size, replace=False))
    return CalibrationSet(
        source="training data",
        detail=f"{dataset} training split, {size} of {len(train_x)} images (seed {seed})",
        calibrate=train_x[chosen],
        verify=test_x,
        verify_labels=test_y,
        verify_detail=f"{dataset} held-out split, with labels",
        held_out=True,
    )


def from_images(
    directory: Path, params: PreprocessParams, size: int | None, seed: int
) -> CalibrationSet:
    """Real images: a fifth (at least 7, at most 64) held out for verification when
    there are 14 or more, the rest (up to `size`) to calibrate on."""
    check_calibration_dir(directory)
    files = image_files(directory)
    order = [files[i] for i in np.random.default_rng(seed).permutation(len(files))]
    n_verify = min(MAX_VERIFY, max(MIN_IMAGES, len(files) // 5))
    held_out = len(files) >= 2 * MIN_IMAGES
    verify_files = order[:n_verify] if held_out else order[:MIN_IMAGES]
    rest = order[n_verify:] if held_out else order
    calibrate_files = rest[: DEFAULT_SIZE["images"] if size is None else size]
    detail = f"{len(calibrate_files)} of {len(files)} images in {directory} (seed {seed})"
    return CalibrationSet(
        source="images",
        detail=detail,
        calibrate=_load(calibrate_files, params),
        verify=_load(verify_files, params),
        verify_labels=None,
        verify_detail=(
            f"{len(verify_files)} held-out images in {directory}"
            if held_out
            else f"{len(verify_files)} of the calibration images (fewer than {2 * MIN_IMAGES} "
            "images: none held out)"
        ),
        held_out=held_out,
    )


def _load(files: list[Path], params: PreprocessParams) -> np.ndarray:
    arrays = []
    for path in files:
        try:
            arrays.append(preprocess(path.read_bytes(), params))
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise ExportError(f"calibration image {path} cannot be read: {exc}") from None
    return np.stack(arrays)


def synthetic(params: PreprocessParams, size: int | None, seed: int) -> CalibrationSet:
    """Seeded synthetic images to calibrate on (`size` 0: none, for fp16), and others
    (another seed) to verify on."""
    size = DEFAULT_SIZE["images"] if size is None else size
    calibrate = [preprocess(_smooth_image(seed, i), params) for i in range(size)]
    verify = [preprocess(_smooth_image(seed + 1, i), params) for i in range(SYNTHETIC_VERIFY)]
    return CalibrationSet(
        source="synthetic",
        detail=(
            f"{size} seeded smooth random images (seed {seed}); no --calibration-dir was "
            "given, so the int8 ranges fit real photos only roughly"
        ),
        calibrate=np.stack(calibrate) if calibrate else np.empty((0, *verify[0].shape), np.float32),
        verify=np.stack(verify),
        verify_labels=None,
        verify_detail=f"{len(verify)} seeded smooth random images (seed {seed + 1})",
        held_out=True,
    )


def _smooth_image(seed: int, index: int) -> Image.Image:
    """A coarse random grid of colours, upsampled: smooth regions and edges, like a photo
    more than white noise is, with a random size and aspect ratio for the resize and crop."""
    rng = np.random.default_rng([seed, index])
    cells = int(rng.integers(2, 17))
    grid = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
    width, height = (int(v) for v in rng.integers(240, 400, 2))
    image = Image.fromarray(grid, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    # Sensor-like noise on top, so that not every pixel lies on a smooth surface.
    noisy = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")
