"""Architectures and their weights: LeNet-5 (ours) and the torchvision ImageNet models.

Weights come from one of three places here: torchvision's weight enums
(`pretrained`), a state-dict checkpoint (`PATH`), or a seeded random
initialisation. Training LeNet-5 lives in `train`.
"""

from __future__ import annotations

import os
import pickle
import socket
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tv

from cnnserve.export.errors import ExportError

# Offline machines fail DNS at once, but a firewall that drops packets would
# otherwise hang for minutes; a few seconds is plenty to tell.
NETWORK_TIMEOUT_S = 5.0


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al., 1998): 32x32x1 → C1 6@5x5 → pool → C3 16@5x5 → pool → 120 → 84 → 10.

    ReLU and max pooling stand in for the paper's scaled tanh and trainable
    subsampling: the same shapes, and they train to the accuracy targets in a
    few epochs. C5 is a 5x5 convolution over the 5x5 maps, as in the paper.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, kernel_size=5),  # C1: 6@28x28
            nn.ReLU(),
            nn.MaxPool2d(2),  # S2: 6@14x14
            nn.Conv2d(6, 16, kernel_size=5),  # C3: 16@10x10
            nn.ReLU(),
            nn.MaxPool2d(2),  # S4: 16@5x5
            nn.Conv2d(16, 120, kernel_size=5),  # C5: 120@1x1
            nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(120, 84),  # F6
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def architecture(name: str, seed: int) -> nn.Module:
    """The model with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    if name == "lenet5":
        return LeNet5().eval()
    # GoogLeNet: the auxiliary heads only matter in training, and an explicit
    # init_weights silences torchvision's FutureWarning about its default.
    options = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    return tv.get_model(name, weights=None, **options).eval()


def imagenet_labels(name: str) -> list[str]:
    """The 1000 category names, from the weight enum's metadata (no download needed)."""
    categories: list[str] = tv.get_model_weights(name).DEFAULT.meta["categories"]
    return list(categories)


class WeightsUnreachable(ExportError):
    """Pretrained weights are neither cached nor downloadable."""


@contextmanager
def _network_timeout() -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(NETWORK_TIMEOUT_S)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def reachable(url: str) -> bool:
    """Whether `url` answers at all; a quick probe before a download that would print and hang."""
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=NETWORK_TIMEOUT_S):
            return True
    except urllib.error.HTTPError:
        return True  # the server answered: we are online
    except (urllib.error.URLError, OSError):
        return False


def pretrained(name: str) -> tuple[nn.Module, str]:
    """torchvision's default ImageNet weights, and the enum that names them.

    Raises WeightsUnreachable when they are not in torch's cache and the
    download server cannot be reached.
    """
    weights = tv.get_model_weights(name).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if not cached.exists() and not reachable(weights.url):
        raise WeightsUnreachable(
            f"pretrained weights for {name} are not cached and {weights.url} is unreachable "
            "(offline?)"
        )
    try:
        with _network_timeout():
            model = tv.get_model(name, weights=weights)
    except (urllib.error.URLError, OSError) as exc:
        raise WeightsUnreachable(f"downloading {weights.url} failed: {exc}") from None
    return model.eval(), f"{type(weights).__name__}.{weights.name}"


def load_checkpoint(model: nn.Module, name: str, path: Path) -> None:
    """Load a state dict saved with `torch.save(model.state_dict(), path)`; one-line errors."""
    if not path.is_file():
        raise ExportError(f"checkpoint {path} does not exist or is not a file")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it half reads
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's advice here (load with weights_only=False) would run code from the file.
        detail = (str(exc).rpartition("WeightsUnpickler error:")[2].strip().splitlines() or [""])[0]
        what = (
            "holds Python objects that only running code from it could load"
            if detail.startswith("Unsupported global")
            else "is not a PyTorch checkpoint"
        )
        raise ExportError(
            f"checkpoint {path} is not a readable PyTorch state dict: it {what} ({detail}); "
            "save one with torch.save(model.state_dict(), path)"
        ) from None
    # torch.load surfaces a damaged file as any of pickle, zip, EOF or runtime
    # errors; all of them mean the same thing to the user.
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(
            f"checkpoint {path} is not a readable PyTorch state dict: {reason}"
        ) from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]  # the common {"state_dict": ..., "epoch": ...} wrapper
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ExportError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    if name == "googlenet":
        # A GoogLeNet trained with its auxiliary heads keeps them in its state
        # dict; inference never uses them.
        state = {k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2."))}
    mismatch = _mismatch(model.state_dict(), state)
    if mismatch:
        raise ExportError(f"checkpoint {path} does not match {name}: {mismatch}")
    model.load_state_dict(state)


def _mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str:
    """A one-line summary of what differs between two state dicts, or '' when they fit."""
    problems = []
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k} {list(given[k].shape)} vs {list(v.shape)}"
        for k, v in expected.items()
        if k in given and given[k].shape != v.shape
    ]
    if missing:
        problems.append(f"{len(missing)} missing key(s) such as {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) such as {unexpected[0]}")
    if shapes:
        problems.append(
            f"{len(shapes)} shape mismatch(es) such as {shapes[0]} (checkpoint vs model)"
        )
    return "; ".join(problems)
