"""Shared fixtures: model repositories exported once per test session.

`lenet5_repository` holds lenet5 trained on the embedded digits (a few
seconds); the server tests use it. `seed_repository` adds alexnet, googlenet,
vgg16 and resnet18 with random weights, reusing that lenet5 export.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SEED_MODELS = ("lenet5", "alexnet", "googlenet", "vgg16", "resnet18")


@pytest.fixture(scope="session")
def lenet5_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with lenet5 version 1, trained on scikit-learn's digits (seed 0)."""
    from cnnserve.export import export_model

    repository = tmp_path_factory.mktemp("lenet5_repository")
    export_model("lenet5", repository, weights="pretrained", dataset="digits", seed=0, version=1)
    return repository


@pytest.fixture(scope="session")
def seed_repository(tmp_path_factory: pytest.TempPathFactory, lenet5_repository: Path) -> Path:
    """lenet5 (trained) and alexnet, googlenet, vgg16, resnet18 (random weights), version 1."""
    from cnnserve.export import export_model

    repository = tmp_path_factory.mktemp("seed_repository")
    shutil.copytree(lenet5_repository / "lenet5", repository / "lenet5")
    for name in SEED_MODELS[1:]:
        export_model(name, repository, weights="random", seed=0, version=1)
    return repository
