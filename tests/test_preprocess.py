"""cnnserve.preprocess: the one image → tensor function shared by training and serving."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cnnserve.export.catalog import IMAGENET, LENET
from cnnserve.preprocess import PreprocessParams, preprocess, to_unit


def photo(width: int, height: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(width * 1000 + height)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


@pytest.mark.parametrize("size", [(400, 300), (300, 401), (224, 224), (1000, 257)])
def test_imagenet_preprocessing_matches_torchvision_weight_transforms(
    size: tuple[int, int],
) -> None:
    from torchvision.models import ResNet18_Weights

    image = photo(*size)
    expected = ResNet18_Weights.DEFAULT.transforms()(image).numpy()
    actual = preprocess(image, IMAGENET.to_config())
    assert actual.shape == expected.shape == (3, 224, 224)
    np.testing.assert_allclose(actual, expected, atol=1e-5)


def test_encoded_bytes_and_pil_images_give_the_same_array() -> None:
    image = photo(64, 48)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    np.testing.assert_array_equal(
        preprocess(buffer.getvalue(), IMAGENET), preprocess(image, IMAGENET)
    )


def test_grayscale_model_gets_one_channel_from_a_color_image() -> None:
    array = preprocess(photo(28, 28), LENET)
    assert array.shape == (1, 32, 32)
    assert array.dtype == np.float32


def test_parameters_round_trip_through_their_config_strings() -> None:
    for params in (IMAGENET, LENET):
        assert PreprocessParams.from_config(params.to_config()) == params


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"color": "CMYK"}, "color"),
        ({"crop": "300"}, "crop"),
        ({"mean": "0.5"}, "3 value"),
        ({"std": "0,1,1"}, "positive"),
    ],
)
def test_bad_parameters_are_refused_with_a_reason(change: dict[str, str], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        PreprocessParams.from_config({**IMAGENET.to_config(), **change})


def test_missing_parameter_is_named() -> None:
    config = IMAGENET.to_config()
    del config["resize"]
    with pytest.raises(ValueError, match="resize"):
        PreprocessParams.from_config(config)


def test_a_sixteen_bit_grayscale_png_keeps_its_content() -> None:
    """PIL opens it as I;16, and converting that to L or RGB clips every value at 255."""
    ramp = np.linspace(4000, 64000, 40 * 40).reshape(40, 40).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, "PNG")
    for color, channels in (("L", 1), ("RGB", 3)):
        params = PreprocessParams(
            color=color, resize=40, crop=40, mean=(0.5,) * channels, std=(0.5,) * channels
        )
        unit = to_unit(buffer.getvalue(), params)
        np.testing.assert_allclose(unit[0], np.rint(ramp / 257) / 255, atol=1e-6)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_photo_is_turned_as_its_exif_orientation_says(fmt: str) -> None:
    """A phone stores a portrait photo lying on its side, with EXIF Orientation 6 ("turn
    90 degrees clockwise to view"); the model is to get it upright, as a viewer shows it."""
    upright = Image.new("RGB", (48, 64), (250, 250, 250))
    upright.paste((0, 0, 0), (0, 0, 48, 20))  # a dark band at the top
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as the sensor saw it
    exif = Image.Exif()
    exif[0x0112] = 6
    tagged, plain, reference = io.BytesIO(), io.BytesIO(), io.BytesIO()
    stored.save(tagged, fmt, exif=exif)
    stored.save(plain, fmt)
    upright.save(reference, fmt)
    params = PreprocessParams(color="L", resize=32, crop=32, mean=(0.0,), std=(1.0,))
    want = to_unit(reference.getvalue(), params)
    assert np.abs(to_unit(tagged.getvalue(), params) - want).mean() < 0.01
    assert np.abs(to_unit(plain.getvalue(), params) - want).mean() > 0.1  # the tag matters
