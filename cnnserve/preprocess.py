"""Image preprocessing shared by training, export and the server's Classify.

One function turns an image into the float32 CHW array a model expects, driven
by the string parameters that the export stage writes into `config.pbtxt`
(`color`, `resize`, `crop`, `mean`, `std`, `interpolation`). LeNet-5 is trained
through this same function, so an image sent to the server is preprocessed
bit for bit as the training data was.

numpy and Pillow only: the server imports this module and has no torch.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image

_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
_CHANNELS = {"L": 1, "RGB": 3}


@dataclass(frozen=True)
class PreprocessParams:
    """How to turn an image into a model input; the config.pbtxt `parameters`."""

    color: str  # "L" (grayscale, one channel) or "RGB"
    resize: int  # target length of the shorter side
    crop: int  # side of the center square that is kept
    mean: tuple[float, ...]  # per channel, applied after scaling pixels to [0, 1]
    std: tuple[float, ...]
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.color not in _CHANNELS:
            raise ValueError(f"color must be one of {sorted(_CHANNELS)}, not {self.color!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}")
        if not 0 < self.crop <= self.resize:
            raise ValueError(f"need 0 < crop <= resize, got crop={self.crop} resize={self.resize}")
        channels = _CHANNELS[self.color]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean and std need {channels} value(s) for color {self.color}")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")

    @property
    def channels(self) -> int:
        return _CHANNELS[self.color]

    @classmethod
    def from_config(cls, parameters: Mapping[str, str]) -> PreprocessParams:
        """Parse the string parameters of a model config; ValueError names what is wrong."""
        try:
            return cls(
                color=parameters["color"],
                resize=int(parameters["resize"]),
                crop=int(parameters["crop"]),
                mean=_floats(parameters["mean"]),
                std=_floats(parameters["std"]),
                interpolation=parameters.get("interpolation", "bilinear"),
            )
        except KeyError as missing:
            raise ValueError(f"preprocessing parameter {missing} is missing") from None

    def to_config(self) -> dict[str, str]:
        """The inverse of `from_config`; `repr` keeps floats exact through the text form."""
        return {
            "color": self.color,
            "resize": str(self.resize),
            "crop": str(self.crop),
            "mean": ",".join(repr(m) for m in self.mean),
            "std": ",".join(repr(s) for s in self.std),
            "interpolation": self.interpolation,
        }


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.split(","))


# EXIF Orientation (TIFF tag 274): how to turn the stored pixels to show the photo upright.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# Grayscale modes PIL opens 16-bit PNGs in: 0..65535, which `convert` clips at 255.
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _orientation(image: Image.Image) -> Image.Transpose | None:
    """How to turn the image upright: cameras and phones store a photo as the sensor saw
    it and say in EXIF how to turn it for display, and the model is to see it as a viewer
    does. EXIF that cannot be read, or an orientation that is no number from 2 to 8,
    leaves the image as stored, as viewers do."""
    try:
        value = image.getexif().get(ExifTags.Base.Orientation)
    except (SyntaxError, ValueError, TypeError, KeyError, OSError, struct.error):
        return None
    return _UPRIGHT.get(value) if isinstance(value, int) else None


def to_unit(image: Image.Image | bytes, params: PreprocessParams) -> np.ndarray:
    """Decode, convert, resize and crop; float32 CHW pixels in [0, 1], not yet normalised."""
    if isinstance(image, bytes | bytearray | memoryview):
        image = Image.open(io.BytesIO(image))
    turn = _orientation(image)
    if turn is not None:
        image = image.transpose(turn)
    if image.mode in _SIXTEEN_BIT:  # PIL's convert would clip every value over 255
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.rint(wide / 257.0).clip(0, 255).astype(np.uint8), "L")
    image = image.convert(params.color)
    width, height = image.size
    # The shorter side becomes `resize`; the longer one is truncated as in
    # torchvision's Resize, whose PIL path the ImageNet weights were trained with.
    if width <= height:
        size = (params.resize, int(params.resize * height / width))
    else:
        size = (int(params.resize * width / height), params.resize)
    if size != image.size:
        image = image.resize(size, _INTERPOLATIONS[params.interpolation])
    # Center crop, rounded as torchvision's CenterCrop rounds for the ImageNet models.
    left = round((size[0] - params.crop) / 2)
    top = round((size[1] - params.crop) / 2)
    image = image.crop((left, top, left + params.crop, top + params.crop))
    pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    if pixels.ndim == 2:
        return pixels[np.newaxis]
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def normalize(unit: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """Apply mean and std to one CHW array or a NCHW batch.

    Elementwise float32 arithmetic, so a batch gives exactly the arrays that
    one image at a time would.
    """
    mean = np.asarray(params.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(params.std, dtype=np.float32).reshape(-1, 1, 1)
    return ((unit - mean) / std).astype(np.float32, copy=False)


def preprocess(
    image: Image.Image | bytes, params: Mapping[str, str] | PreprocessParams
) -> np.ndarray:
    """The float32 CHW array the model expects for one image (PIL or encoded bytes)."""
    if not isinstance(params, PreprocessParams):
        params = PreprocessParams.from_config(params)
    return normalize(to_unit(image, params), params)
