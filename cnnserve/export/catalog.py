"""What each exportable model is, without torch: names, tensor shapes, defaults, preprocessing.

The CLI validates its arguments against this table before importing torch, so
a typo fails in a fraction of a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cnnserve.export.calibration import check_calibration_dir
from cnnserve.export.errors import ExportError
from cnnserve.preprocess import PreprocessParams

INPUT_NAME = "input"
OUTPUT_NAME = "logits"

# torchvision's ImageNet recipe (Resize(256), CenterCrop(224), Normalize), as
# in the weight enums' `transforms()`.
IMAGENET = PreprocessParams(
    color="RGB",
    resize=256,
    crop=224,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
)
# LeNet-5 uses the customary MNIST statistics whatever it trains on, so a
# checkpoint exported with `--weights PATH` gets the same preprocessing as
# the run that made it.
LENET = PreprocessParams(color="L", resize=32, crop=32, mean=(0.1307,), std=(0.3081,))


@dataclass(frozen=True)
class ModelSpec:
    name: str
    input_dims: tuple[int, int, int]  # C, H, W; the batch axis is dynamic
    num_classes: int
    default_max_batch_size: int
    preprocessing: PreprocessParams

    @property
    def torchvision(self) -> bool:
        """Whether the architecture and weights come from torchvision."""
        return self.name != "lenet5"


def _imagenet(name: str) -> ModelSpec:
    return ModelSpec(name, (3, 224, 224), 1000, 32, IMAGENET)


MODELS: dict[str, ModelSpec] = {
    "lenet5": ModelSpec("lenet5", (1, 32, 32), 10, 128, LENET),
    **{
        name: _imagenet(name)
        for name in (
            "alexnet",
            "googlenet",
            "vgg16",
            "resnet18",
            "resnet34",
            "resnet50",
            "resnet101",
            "resnet152",
        )
    },
}


def spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ExportError(f"unknown model {name!r}; choose from {', '.join(MODELS)}") from None


WEIGHT_KEYWORDS = ("pretrained", "random", "auto")
# For a variant: convert the fp32 model already in the repository.
REPOSITORY = "repository"


def check_options(
    weights: str, max_batch_size: int | None, epochs: int | None, variant: str | None = None
) -> None:
    """Option checks that need neither torch nor the model."""
    if weights == REPOSITORY:
        if variant is None:
            raise ExportError(f"--weights {REPOSITORY} needs --quantize int8 or --fp16")
    elif weights not in WEIGHT_KEYWORDS and not Path(weights).expanduser().is_file():
        keywords = ", ".join((*WEIGHT_KEYWORDS, REPOSITORY))
        raise ExportError(f"--weights {weights}: not a checkpoint file, nor one of {keywords}")
    if max_batch_size is not None and max_batch_size < 1:
        raise ExportError(f"max batch size must be at least 1, not {max_batch_size}")
    if epochs is not None and epochs < 1:
        raise ExportError(f"epochs must be at least 1, not {epochs}")


VARIANTS = ("int8", "fp16")


def variant_name(name: str, variant: str | None) -> str:
    """The repository name of a model's variant: `resnet18_int8`; the model's own for fp32."""
    return f"{name}_{variant}" if variant else name


def check_variant_options(
    variant: str | None, calibration_dir: Path | None, calibration_size: int | None
) -> None:
    """`--quantize int8` / `--fp16` and the calibration options that go with int8."""
    if variant is not None and variant not in VARIANTS:
        raise ExportError(f"unknown variant {variant!r}; choose {' or '.join(VARIANTS)}")
    if variant != "int8" and (calibration_dir is not None or calibration_size is not None):
        raise ExportError("--calibration-dir and --calibration-size only apply to --quantize int8")
    if calibration_size is not None and calibration_size < 1:
        raise ExportError(f"calibration size must be at least 1, not {calibration_size}")
    if calibration_dir is not None:
        check_calibration_dir(calibration_dir)
