"""The bench's model repositories under `.bench/`, exported once and reused.

- `.bench/repository`: lenet5, resnet18 and resnet50 with random weights,
  exported by `cnnserve export` (torch is needed only this first time);
  `<model>_int8` variants join it when found (see `find_int8`).
- `.bench/batched` and `.bench/unbatched`: the same files (hard links), with
  configs pinned to the CPU; the second has no `dynamic_batching`, so that
  every request runs alone (Triton's semantics).
- `.bench/gpu`: the same, pinned to GPU 0, for the GPU section.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from google.protobuf import text_format

import cnnserve.export
from bench.raw import read_config
from cnnserve.v1 import model_config_pb2 as mc

INT8_VARIANTS = ("lenet5_int8", "resnet18_int8")
_KINDS = {"cpu": mc.ModelInstanceGroup.KIND_CPU, "gpu": mc.ModelInstanceGroup.KIND_GPU}


def present(repository: Path, name: str) -> bool:
    return any((repository / name).glob("*/model.onnx"))


def _export(args: Sequence[str], log: Path, timeout: float) -> str | None:
    """Run `cnnserve export ARGS`; None on success, else why it failed."""
    cmd = [sys.executable, "-m", "cnnserve", "export", *args]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        try:
            subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=True, timeout=timeout)
        except (OSError, subprocess.SubprocessError) as exc:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            return f"{exc}: {' / '.join(tail)}"
    return None


def _export_fingerprint() -> str:
    """A digest of the export code: its defaults (batching, preprocessing) land in configs."""
    package = Path(cnnserve.export.__file__).parent
    digest = hashlib.sha256()
    for path in sorted([*package.glob("*.py"), package.parent / "preprocess.py"]):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def export_missing(repository: Path, models: Sequence[str], log: Path) -> list[str]:
    """Export with random weights whichever models are missing; returns those exported.

    When the export code changed since the repository was written, everything
    in it is exported again (int8 variants included, by `find_int8`), so that
    the configs carry today's defaults, as `make models` does.
    """
    stamp = repository / ".exported"
    fingerprint = _export_fingerprint()
    if stamp.exists() and stamp.read_text() != fingerprint:
        shutil.rmtree(repository)
    missing = [m for m in models if not present(repository, m)]
    if missing:
        common = ["--weights", "random", "--repository", str(repository), "--version", "1"]
        error = _export([*missing, *common, "--force"], log, timeout=900)
        if error is not None:
            raise RuntimeError(f"cannot export {missing}: {error}")
    stamp.write_text(fingerprint)
    return missing


def _link_tree(source: Path, target: Path) -> None:
    """Copy a folder with hard links where the filesystem allows (models are large)."""
    for path in source.rglob("*"):
        dest = target / path.relative_to(source)
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, dest)
        except OSError:
            shutil.copy2(path, dest)


def find_int8(repository: Path, elsewhere: Sequence[Path], log: Path) -> dict[str, str]:
    """Where each int8 variant came from (or why it is absent).

    A variant already in the bench repository is used; else one in `elsewhere`
    (e.g. ./model_repository) is linked in; else, when `cnnserve export`
    offers `--quantize int8`, the bench exports it once with random weights.
    """
    found: dict[str, str] = {}
    for name in INT8_VARIANTS:
        if present(repository, name):
            found[name] = f"in {repository}"
            continue
        source = next((r for r in elsewhere if present(r, name)), None)
        if source is not None:
            _link_tree(source / name, repository / name)
            found[name] = f"linked from {source}"
    missing = [n.removesuffix("_int8") for n in INT8_VARIANTS if n not in found]
    if missing:
        help_text = subprocess.run(
            [sys.executable, "-m", "cnnserve", "export", "--help"],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        if "--quantize" not in help_text:
            for m in missing:
                found[f"{m}_int8"] = "absent: `cnnserve export` has no --quantize yet"
            return found
        common = ["--weights", "random", "--repository", str(repository), "--version", "1"]
        error = _export([*missing, "--quantize", "int8", *common], log, timeout=600)
        for m in missing:
            name = f"{m}_int8"
            ok = present(repository, name)
            found[name] = "exported by the bench" if ok else f"absent: export failed: {error}"
    return found


def convert(repository: Path, model: str, kind: str, log: Path) -> str:
    """`<model>_<kind>` (kind "int8" or "fp16") in the repository: there already, or
    converted once from the fp32 model there (`--weights repository`). Says which, or why
    it is absent."""
    name = f"{model}_{kind}"
    if present(repository, name):
        return f"in {repository}"
    how = ["--fp16"] if kind == "fp16" else ["--quantize", kind]
    where = ["--weights", "repository", "--repository", str(repository), "--version", "1"]
    error = _export([model, *how, *where], log, timeout=900)
    if present(repository, name):
        return f"converted by the bench from {model}"
    return f"absent: the conversion failed: {error}"


def variant(
    source: Path, target: Path, models: Sequence[str], *, device: str, batching: bool = True
) -> Path:
    """A copy of `models` whose configs run on `device`, with or without dynamic batching."""
    shutil.rmtree(target, ignore_errors=True)
    for name in models:
        _link_tree(source / name, target / name)
        config = read_config(source / name)
        count = sum(max(1, g.count) for g in config.instance_group) or 1
        del config.instance_group[:]
        config.instance_group.add(count=count, kind=_KINDS[device])
        if not batching:
            config.ClearField("dynamic_batching")
        (target / name / "config.pbtxt").unlink()  # a hard link: never write through it
        (target / name / "config.pbtxt").write_text(text_format.MessageToString(config))
    return target
