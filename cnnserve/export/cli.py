"""`cnnserve export`: the command line over `export_model`, with a summary table.

Arguments are checked (model names, repository, versions) before torch is
imported, so mistakes fail fast; every user error is one line on stderr and
a non-zero exit.

`--quantize int8` and `--fp16` write `<model>_int8` and `<model>_fp16`
instead of the fp32 model, converted from an fp32 export of the same weights
made on the way, or with `--weights repository` from the fp32 model already
in the repository. Both flags write both variants.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cnnserve.export import write
from cnnserve.export.catalog import (
    MODELS,
    REPOSITORY,
    check_options,
    check_variant_options,
    spec,
    variant_name,
)
from cnnserve.export.errors import ExportError

if TYPE_CHECKING:
    from cnnserve.export.api import ExportResult

PROG = "cnnserve export"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="*", metavar="MODEL", help=f"any of: {' '.join(MODELS)}")
    parser.add_argument("--all", action="store_true", help="export all nine models")
    parser.add_argument(
        "--repository", type=Path, default=Path("model_repository"), help="default: %(default)s"
    )
    parser.add_argument("--version", type=int, help="version number (default: next free)")
    parser.add_argument(
        "--weights",
        default="auto",
        metavar="pretrained|random|auto|PATH|repository",
        help="torchvision ImageNet weights (lenet5: trained here), seeded random, pretrained "
        "when reachable else random, a state-dict checkpoint, or (variants only) the latest "
        "fp32 version already in --repository (default: %(default)s)",
    )
    parser.add_argument("--max-batch-size", type=int, help="default: 128 for lenet5, 32 others")
    parser.add_argument("--opset", type=int, default=20, help="ONNX opset (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace an existing version")
    parser.add_argument("--seed", type=int, default=0, help="for weights, data split and training")
    parser.add_argument("--mnist-dir", type=Path, help="train lenet5 on MNIST IDX files here")
    parser.add_argument(
        "--dataset",
        choices=("auto", "mnist", "digits"),
        default="auto",
        help="lenet5 training data; auto: --mnist-dir, else MNIST download, else digits",
    )
    parser.add_argument(
        "--epochs", type=int, help="lenet5 training epochs (default: 15 digits, 4 MNIST)"
    )
    variants = parser.add_argument_group(
        "variants", "written as their own models, <model>_int8 and <model>_fp16, instead of fp32"
    )
    variants.add_argument(
        "--quantize",
        choices=("int8",),
        help="static int8 quantization (QDQ, per-channel), calibrated on --calibration-dir, "
        "else lenet5's training images, else synthetic images",
    )
    variants.add_argument(
        "--fp16", action="store_true", help="half precision for GPUs; input and output stay FP32"
    )
    variants.add_argument(
        "--calibration-dir", type=Path, metavar="DIR", help="JPEG/PNG images to calibrate int8 on"
    )
    variants.add_argument(
        "--calibration-size",
        type=int,
        metavar="N",
        help="calibration inputs (default: 512 for lenet5, 128 images otherwise)",
    )


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


def _variants(args: argparse.Namespace) -> list[str | None]:
    """What to write of each model: fp32 (None), or the variants asked for."""
    asked: list[str | None] = [args.quantize] if args.quantize else []
    if args.fp16:
        asked.append("fp16")
    return asked or [None]


def _preflight(args: argparse.Namespace) -> list[str]:
    """The models to export, after the checks that need no torch."""
    if args.all and args.models:
        raise ExportError("give model names or --all, not both")
    names = list(MODELS) if args.all else list(dict.fromkeys(args.models))
    if not names:
        raise ExportError(f"name at least one model ({' '.join(MODELS)}) or pass --all")
    for name in names:
        spec(name)
    check_options(args.weights, args.max_batch_size, args.epochs, _variants(args)[0])
    check_variant_options(args.quantize, args.calibration_dir, args.calibration_size)
    write.check_repository(args.repository)
    for name in names:
        if args.weights == REPOSITORY:
            write.latest_model(args.repository / name, f"--weights {REPOSITORY}")
        for variant in _variants(args):
            write.resolve_version(
                args.repository / variant_name(name, variant), args.version, args.force
            )
    return names


def run(args: argparse.Namespace) -> int:
    try:
        names = _preflight(args)
    except ExportError as exc:
        return _fail(str(exc))
    from cnnserve.export.api import export_model  # imports torch: only now

    results: list[ExportResult] = []
    try:
        for name in names:
            for variant in _variants(args):
                result = export_model(
                    name,
                    args.repository,
                    weights=args.weights,
                    version=args.version,
                    max_batch_size=args.max_batch_size,
                    opset=args.opset,
                    force=args.force,
                    seed=args.seed,
                    mnist_dir=args.mnist_dir,
                    dataset=args.dataset,
                    epochs=args.epochs,
                    variant=variant,
                    # The calibration options are int8's; fp16 needs none.
                    calibration_dir=args.calibration_dir if variant == "int8" else None,
                    calibration_size=args.calibration_size if variant == "int8" else None,
                )
                results.append(result)
                _report(result)
    except ExportError as exc:
        _summary(results)
        return _fail(str(exc))
    except KeyboardInterrupt:
        _summary(results)
        _fail("interrupted; the model being exported was not written")
        return 130
    _summary(results)
    return 0


def _report(result: ExportResult) -> None:
    line = f"{result.name}: version {result.version} written to {result.path}"
    if result.accuracy is not None:
        line += f"; held-out accuracy {result.accuracy:.2%}"
        if result.reference_accuracy is not None:
            line += f" (fp32 {result.reference_accuracy:.2%})"
    if result.agreement is not None:
        # Rounded down: 99.97% must not read as 100.0%.
        line += f"; top-1 agrees with fp32 on {math.floor(result.agreement * 1000) / 10:.1f}%"
    if result.speedup is not None:
        line += f"; {result.speedup:.2f}x fp32's speed at batch 8 on this CPU"
    print(line, flush=True)
    if result.warning:
        print(f"WARNING: {result.name}: {result.warning}", file=sys.stderr, flush=True)


def _summary(results: list[ExportResult]) -> None:
    if not results:
        return
    header = ("model", "version", "weights", "parity abs / rel", "accuracy", "size", "time")
    rows = [
        (
            r.name,
            str(r.version),
            r.weights + (" (!)" if r.warning else ""),
            f"{r.max_abs_error:.1e} / {r.max_rel_error:.1e}",
            f"{r.accuracy:.2%}" if r.accuracy is not None else "-",
            f"{r.size_bytes / 1e6:.1f} MB",
            f"{r.seconds:.1f} s",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    print()
    for row in (header, *rows):
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
