"""The export stage: PyTorch CNNs to a verified, versioned ONNX model repository.

Modules: `catalog` (the models and their shapes), `zoo` (architectures and
weights), `train` (LeNet-5 training), `onnx` (export and verification),
`write` (the repository entry), `api` (`export_model`, which ties them
together) and `cli` (`cnnserve export`).

`export_model` and `ExportResult` are imported lazily, so that importing this
package (as `cnnserve export --help` does) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cnnserve.export.errors import ExportError

if TYPE_CHECKING:
    from cnnserve.export.api import ExportResult, export_model

__all__ = ["ExportError", "ExportResult", "export_model"]


def __getattr__(name: str) -> Any:
    if name in ("ExportResult", "export_model"):
        return getattr(importlib.import_module("cnnserve.export.api"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
