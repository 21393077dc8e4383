"""Render our kustomizations: with `kubectl kustomize` when it is on PATH, else in Python.

The Python renderer covers only the subset of kustomize that deploy/ uses, and it
refuses anything else (UnsupportedKustomization) rather than render it wrongly:
- Kustomization and Component files; `resources` (YAML files or directories) and
  `components`;
- `configMapGenerator` (literals, files; behavior create, merge, replace) with
  `generatorOptions` (disableNameSuffixHash, labels), the content-hash name suffix
  computed as kustomize v5 does, and the renamed ConfigMap followed in pod specs;
- `images` (newName, newTag, digest) on containers and init containers;
- `patches`: JSON 6902 (add, remove, replace, test) with a target, and strategic
  merge patches that delete a resource (`$patch: delete`).
When kubectl is present, tests/test_deploy.py checks that both render the same objects.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]
KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
KNOWN_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "components",
    "configMapGenerator",
    "generatorOptions",
    "images",
    "patches",
}
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


class UnsupportedKustomization(Exception):
    """The kustomization uses a feature this renderer does not implement."""


@dataclass
class _Resource:
    obj: Obj
    hashed: bool = False  # a generated ConfigMap that gets the content-hash suffix


def kubectl() -> str | None:
    """kubectl's path when it is installed and its built-in kustomize runs."""
    path = shutil.which("kubectl")
    if path is None:
        return None
    probe = subprocess.run(
        [path, "kustomize", "--help"], capture_output=True, timeout=60, check=False
    )
    return path if probe.returncode == 0 else None


def render_with_kubectl(directory: Path, kubectl_path: str) -> list[Obj]:
    done = subprocess.run(
        [kubectl_path, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory} failed:\n{done.stderr}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def render_in_python(directory: Path) -> list[Obj]:
    resources = _build(directory, [], expect="Kustomization")
    renames = _add_hash_suffixes(resources)
    objs = [r.obj for r in resources]
    for obj in objs:
        _rename_config_map_refs(obj, renames)
    return objs


def _load_kustomization(directory: Path) -> Obj:
    for name in KUSTOMIZATION_FILES:
        path = directory / name
        if path.is_file():
            data = yaml.safe_load(path.read_text()) or {}
            unknown = set(data) - KNOWN_FIELDS
            if unknown:
                raise UnsupportedKustomization(f"{path}: fields {sorted(unknown)}")
            return dict(data)
    raise FileNotFoundError(f"no kustomization file in {directory}")


def _build(directory: Path, inherited: list[_Resource], expect: str) -> list[_Resource]:
    k = _load_kustomization(directory)
    kind = k.get("kind", "Kustomization")
    if kind != expect:
        raise UnsupportedKustomization(f"{directory}: a {kind} where a {expect} belongs")
    resources = list(inherited)
    for entry in k.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            resources += _build(path, [], expect="Kustomization")
        else:
            docs = yaml.safe_load_all(path.read_text())
            resources += [_Resource(doc) for doc in docs if doc]
    for entry in k.get("components", []):
        resources = _build((directory / entry).resolve(), resources, expect="Component")
    _generate_config_maps(directory, k, resources)
    resources = _apply_patches(directory, k.get("patches", []), resources)
    for image in k.get("images", []):
        for r in resources:
            _set_image(r.obj, image)
    return resources


# --- configMapGenerator --------------------------------------------------------


def _generate_config_maps(directory: Path, k: Obj, resources: list[_Resource]) -> None:
    options = dict(k.get("generatorOptions", {}))
    if set(options) - {"disableNameSuffixHash", "labels"}:
        raise UnsupportedKustomization(f"generatorOptions {sorted(options)}")
    for gen in k.get("configMapGenerator", []):
        if set(gen) - {"name", "behavior", "literals", "files"}:
            raise UnsupportedKustomization(f"configMapGenerator fields {sorted(gen)}")
        data = dict(_literal(item) for item in gen.get("literals", []))
        data.update(_file_entry(directory, item) for item in gen.get("files", []))
        behavior = gen.get("behavior", "create")
        existing = [r for r in resources if _is_config_map(r.obj, gen["name"])]
        if behavior == "create":
            if existing:
                raise ValueError(f"ConfigMap {gen['name']} is generated twice")
            obj: Obj = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": gen["name"]},
                "data": data,
            }
            if options.get("labels"):
                obj["metadata"]["labels"] = dict(options["labels"])
            hashed = not options.get("disableNameSuffixHash", False)
            resources.append(_Resource(obj, hashed=hashed))
        elif behavior in ("merge", "replace") and len(existing) == 1:
            target = existing[0].obj
            target["data"] = {**target.get("data", {}), **data} if behavior == "merge" else data
        else:
            raise UnsupportedKustomization(f"behavior {behavior} for {gen['name']}")


def _literal(item: str) -> tuple[str, str]:
    key, _, value = item.partition("=")
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    return key, value


def _file_entry(directory: Path, item: str) -> tuple[str, str]:
    key, sep, rel = item.partition("=")
    path = directory / (rel if sep else key)
    return (key if sep else path.name), path.read_text()


def _is_config_map(obj: Obj, name: str) -> bool:
    return bool(obj.get("kind") == "ConfigMap" and obj["metadata"]["name"] == name)


def config_map_hash(obj: Obj) -> str:
    """kustomize v5's suffix: its encoder leaves the name empty, so only data counts."""
    encoded = {"kind": "ConfigMap", "name": "", "data": obj.get("data", {})}
    if obj.get("binaryData"):
        encoded["binaryData"] = obj["binaryData"]
    text = json.dumps(encoded, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # Go's encoding/json escapes these three, so the bytes hashed must too.
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def _add_hash_suffixes(resources: list[_Resource]) -> dict[str, str]:
    renames = {}
    for r in resources:
        if r.hashed:
            old = r.obj["metadata"]["name"]
            r.obj["metadata"]["name"] = renames[old] = f"{old}-{config_map_hash(r.obj)}"
    return renames


def _pod_specs(obj: Obj) -> list[Obj]:
    if obj.get("kind") not in POD_TEMPLATE_KINDS:
        return []
    return [obj["spec"]["template"]["spec"]]


def _containers(obj: Obj) -> list[Obj]:
    return [
        c
        for spec in _pod_specs(obj)
        for c in spec.get("initContainers", []) + spec.get("containers", [])
    ]


def _rename_config_map_refs(obj: Obj, renames: dict[str, str]) -> None:
    def rename(holder: Obj | None) -> None:
        if holder is not None and holder.get("name") in renames:
            holder["name"] = renames[holder["name"]]

    for c in _containers(obj):
        for source in c.get("envFrom", []):
            rename(source.get("configMapRef"))
        for var in c.get("env", []):
            rename(var.get("valueFrom", {}).get("configMapKeyRef"))
    for spec in _pod_specs(obj):
        for volume in spec.get("volumes", []):
            rename(volume.get("configMap"))


# --- images ---------------------------------------------------------------------

_IMAGE = re.compile(r"^(?P<name>[^@]+?)(?::(?P<tag>[\w][\w.-]*))?(?:@(?P<digest>.+))?$")


def _set_image(obj: Obj, rule: Obj) -> None:
    if set(rule) - {"name", "newName", "newTag", "digest"}:
        raise UnsupportedKustomization(f"images entry {sorted(rule)}")
    for c in _containers(obj):
        match = _IMAGE.match(c["image"])
        if match is None or match["name"] != rule["name"]:
            continue
        name = rule.get("newName", match["name"])
        if "digest" in rule:
            c["image"] = f"{name}@{rule['digest']}"
        elif "newTag" in rule:
            c["image"] = f"{name}:{rule['newTag']}"
        else:
            c["image"] = name + c["image"][len(match["name"]) :]


# --- patches --------------------------------------------------------------------


def _apply_patches(
    directory: Path, patches: list[Obj], resources: list[_Resource]
) -> list[_Resource]:
    for entry in patches:
        if set(entry) - {"path", "patch", "target"}:
            raise UnsupportedKustomization(f"patch fields {sorted(entry)}")
        text = (directory / entry["path"]).read_text() if "path" in entry else entry["patch"]
        body = yaml.safe_load(text)
        if isinstance(body, list):
            targets = [r for r in resources if _matches(r.obj, entry.get("target"))]
            for r in targets:
                r.obj = json_patch(r.obj, body)
        elif isinstance(body, dict) and body.get("$patch") == "delete":
            target = entry.get("target") or {
                "kind": body["kind"],
                "name": body["metadata"]["name"],
            }
            resources = [r for r in resources if not _matches(r.obj, target)]
        else:
            raise UnsupportedKustomization("strategic merge patches other than $patch: delete")
    return resources


def _matches(obj: Obj, target: Obj | None) -> bool:
    if not target:
        raise UnsupportedKustomization("a JSON 6902 patch needs a target")
    if set(target) - {"group", "version", "kind", "name"}:
        raise UnsupportedKustomization(f"patch target fields {sorted(target)}")
    group, _, version = obj["apiVersion"].rpartition("/")
    actual = {"group": group, "version": version, "kind": obj["kind"]}
    if any(target[key] != actual[key] for key in ("group", "version", "kind") if key in target):
        return False
    return "name" not in target or re.fullmatch(target["name"], obj["metadata"]["name"]) is not None


def json_patch(doc: Obj, operations: list[Obj]) -> Obj:
    """RFC 6902 add, remove, replace and test on a copy of `doc`."""
    doc = copy.deepcopy(doc)
    for op in operations:
        keys = [k.replace("~1", "/").replace("~0", "~") for k in op["path"].split("/")[1:]]
        if not keys:
            raise UnsupportedKustomization("a patch of the whole document")
        parent: Any = doc
        for key in keys[:-1]:
            parent = parent[int(key)] if isinstance(parent, list) else parent[key]
        if op["op"] not in ("add", "remove", "replace", "test"):
            raise UnsupportedKustomization(f"JSON patch op {op['op']}")
        if isinstance(parent, list):
            _patch_list(parent, keys[-1], op)
        else:
            _patch_dict(parent, keys[-1], op)
    return doc


def _patch_list(parent: list[Any], key: str, op: Obj) -> None:
    index = len(parent) if key == "-" else int(key)
    if op["op"] == "add":
        parent.insert(index, op["value"])
    elif op["op"] == "remove":
        del parent[index]
    elif op["op"] == "replace":
        parent[index] = op["value"]
    else:
        _test(parent[index], op)


def _patch_dict(parent: Obj, key: str, op: Obj) -> None:
    if op["op"] != "add" and key not in parent:
        raise KeyError(f"{op['op']} of the missing {op['path']}")
    if op["op"] in ("add", "replace"):
        parent[key] = op["value"]
    elif op["op"] == "remove":
        del parent[key]
    else:
        _test(parent[key], op)


def _test(actual: Any, op: Obj) -> None:
    if actual != op["value"]:
        raise ValueError(f"JSON patch test failed at {op['path']}: {actual!r} != {op['value']!r}")
