"""Reading a Triton-layout model repository: configs, versions, labels.

    <repository>/<model>/config.pbtxt          protobuf text of ModelConfig (optional)
    <repository>/<model>/<version>/model.onnx  one folder per integer version
    <repository>/<model>/<label_filename>      one label per line, per output

Pure file reading: no onnxruntime here. A config that names fields cnnserve
does not support is still read; those fields are ignored with a warning.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format

from cnnserve.server.errors import InvalidInput, ModelLoadError, ModelNotFound
from cnnserve.v1 import model_config_pb2 as mc

log = logging.getLogger(__name__)

CONFIG_FILE = "config.pbtxt"
DEFAULT_MODEL_FILE = "model.onnx"
ONNX_PLATFORMS = {"", "onnxruntime_onnx"}
ONNX_BACKENDS = {"", "onnxruntime"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def check_model_name(name: str) -> None:
    """Model names are plain folder names: no separators, no `..`, no NUL."""
    if not _NAME.match(name) or ".." in name:
        raise InvalidInput(f"invalid model name {name!r}: use letters, digits, '_', '-', '.'")


@dataclass
class ModelSource:
    """What the repository says about one model, before anything is loaded."""

    name: str
    path: Path
    config: mc.ModelConfig
    versions: dict[int, Path]  # version -> model file, already filtered by the version policy
    labels: dict[str, list[str]] = field(default_factory=dict)  # output name -> labels
    fingerprint: tuple[object, ...] = ()


def list_models(repository: Path) -> list[str]:
    """Names of the model folders in the repository (hidden and temporary ones skipped)."""
    if not repository.is_dir():
        raise ModelLoadError(f"model repository {repository} is not a folder")
    return sorted(
        p.name
        for p in repository.iterdir()
        if p.is_dir() and not p.name.startswith((".", "_")) and _NAME.match(p.name)
    )


# Triton config sections that change what serving means: ignoring one would serve the
# model wrongly (a stateful sequence model as a stateless one), so a config with one fails.
_UNSERVABLE = ("sequence_batching", "ensemble_scheduling")
_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|#[^\n]*|[{}<>\[\]:]|[A-Za-z_]\w*')
_warned: set[str] = set()


def _top_level_fields(text: str) -> list[str]:
    """The field names at the top level of a text-format message."""
    tokens = [t.group() for t in _TOKEN.finditer(text) if not t.group().startswith("#")]
    names, depth = [], 0
    for token, following in zip(tokens, [*tokens[1:], ""], strict=True):
        if token in "{<[":
            depth += 1
        elif token in "}>]":
            depth -= 1
        elif depth == 0 and (token[0].isalpha() or token[0] == "_") and following in ":{<[":
            names.append(token)
    return names


def parse_config(text: str, origin: str) -> mc.ModelConfig:
    """Parse config.pbtxt; unknown fields are logged (once) and ignored, other errors raise."""
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config)
        return config
    except text_format.ParseError as strict_error:
        if "has no field named" not in str(strict_error):
            raise ModelLoadError(f"{origin}: {strict_error}") from strict_error
        known = set(mc.ModelConfig.DESCRIPTOR.fields_by_name)
        unknown = sorted({f for f in _top_level_fields(text) if f not in known})
        refused = [f for f in unknown if f in _UNSERVABLE]
        if refused:
            why = f"{origin}: cnnserve cannot serve a model with {refused[0]}"
            raise ModelLoadError(why) from None
        config = mc.ModelConfig()
        try:
            text_format.Parse(text, config, allow_unknown_field=True)
        except text_format.ParseError as exc:
            raise ModelLoadError(f"{origin}: {exc}") from exc
        what = ", ".join(unknown) if unknown else str(strict_error)
        message = f"{origin}: ignoring fields cnnserve does not support ({what})"
        if message not in _warned:  # a poll scan reads the config again and again
            _warned.add(message)
            log.warning("%s", message)
        return config


def _numeric(name: str) -> bool:
    """A version folder's name: ASCII digits only ("²" is a digit to str.isdigit, not to int)."""
    return name.isascii() and name.isdigit()


def _version_folders(model_dir: Path, model_file: str) -> dict[int, Path]:
    found = {}
    for p in model_dir.iterdir():
        if p.is_dir() and _numeric(p.name) and int(p.name) > 0 and (p / model_file).is_file():
            found[int(p.name)] = p / model_file
    return found


def select_versions(available: dict[int, Path], policy: mc.ModelVersionPolicy) -> dict[int, Path]:
    """Apply the version policy: latest N (default 1), all, or specific versions."""
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return dict(available)
    if choice == "specific":
        return {v: available[v] for v in policy.specific.versions if v in available}
    keep = policy.latest.num_versions if choice == "latest" else 1
    newest = sorted(available, reverse=True)[: max(1, keep)]
    return {v: available[v] for v in newest}


def _read_labels(model_dir: Path, config: mc.ModelConfig) -> dict[str, list[str]]:
    labels = {}
    for output in config.output:
        if not output.label_filename:
            continue
        path = (model_dir / output.label_filename).resolve()
        if model_dir.resolve() not in path.parents:
            raise ModelLoadError(f"label file {output.label_filename!r} is outside the model")
        try:
            labels[output.name] = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ModelLoadError(f"cannot read labels {output.label_filename}: {exc}") from exc
    return labels


def _fingerprint(model_dir: Path, versions: dict[int, Path]) -> tuple[object, ...]:
    """Changes whenever a file that matters changes: poll mode reloads on a new value."""
    files = [model_dir / CONFIG_FILE, *model_dir.glob("*.txt")]
    for model_file in versions.values():
        files.extend(sorted(model_file.parent.iterdir()))
    stats = []
    for f in files:
        try:
            st = f.stat()
            stats.append((str(f), st.st_mtime_ns, st.st_size))
        except OSError:
            continue
    return (tuple(sorted(versions)), tuple(stats))


def read_model(repository: Path, name: str) -> ModelSource:
    """Read one model's folder; raises ModelNotFound or ModelLoadError with the reason."""
    check_model_name(name)
    model_dir = repository / name
    if not model_dir.is_dir():
        raise ModelNotFound(f"model {name!r} is not in the repository")
    config_path = model_dir / CONFIG_FILE
    if config_path.is_file():
        config = parse_config(config_path.read_text(encoding="utf-8"), f"{name}/{CONFIG_FILE}")
    else:
        config = mc.ModelConfig()
    if config.name and config.name != name:
        raise ModelLoadError(f"config name {config.name!r} does not match folder {name!r}")
    config.name = name
    if config.platform not in ONNX_PLATFORMS or config.backend not in ONNX_BACKENDS:
        raise ModelLoadError(
            f"unsupported platform {config.platform or config.backend!r}: cnnserve serves ONNX"
        )
    config.platform = "onnxruntime_onnx"
    config.backend = "onnxruntime"
    model_file = config.default_model_filename or DEFAULT_MODEL_FILE
    available = _version_folders(model_dir, model_file)
    if not available:
        raise ModelLoadError(f"no version folder with {model_file} under {name}/")
    versions = select_versions(available, config.version_policy)
    if not versions:
        raise ModelLoadError("the version policy selects none of the versions present")
    return ModelSource(
        name=name,
        path=model_dir,
        config=config,
        versions=versions,
        labels=_read_labels(model_dir, config),
        fingerprint=_fingerprint(model_dir, versions),
    )
