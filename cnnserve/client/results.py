"""What the client's calls return: plain Python and numpy, no protobuf messages."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ClassScore:
    """One class of a classified image; unpacks as (index, label, score)."""

    index: int
    label: str
    score: float  # softmax probability

    # A dataclass, not a NamedTuple: a tuple's own `index` method would clash with the field.
    def __iter__(self) -> Iterator[int | str | float]:
        return iter((self.index, self.label, self.score))


@dataclass(frozen=True)
class ClassifiedImage:
    """One image's top-k classes, best first, and the model version that ran."""

    model: str
    version: str
    classes: list[ClassScore]

    @property
    def top(self) -> ClassScore:
        return self.classes[0]


@dataclass(frozen=True)
class InferResult:
    """A ModelInfer answer; the arrays are read-only views of the response bytes."""

    model: str
    version: str
    id: str
    outputs: dict[str, np.ndarray] = field(default_factory=dict)

    def as_numpy(self, name: str) -> np.ndarray:
        """An output by name, as tritonclient's `InferResult.as_numpy`; KeyError if absent."""
        return self.outputs[name]


@dataclass(frozen=True)
class ModelInfo:
    """One RepositoryIndex entry; `provider` is the execution provider of a ready version."""

    name: str
    version: str
    state: str  # READY, LOADING or UNAVAILABLE
    reason: str = ""
    provider: str = ""
