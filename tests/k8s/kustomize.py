"""The part of kustomize that k8s/ uses, so CI can render the overlays without the kustomize binary:
resources (files and folders), namespace, images, configMapGenerator (literals, files; no name hash),
replacements, and inline JSON 6902 patches with a kind/name target. A kustomization using anything else
fails here, naming the key: extend this file (and check it against `kubectl kustomize`) before using it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "images", "generatorOptions", "configMapGenerator",
             "replacements", "patches"}
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding",
                  "CustomResourceDefinition"}


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def files_used(directory: Path) -> set[Path]:
    """Every file a kustomization (and those it includes) reads, itself included."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    used = {directory / "kustomization.yaml"}
    for res in k.get("resources", []):
        path = (directory / res).resolve()
        used |= files_used(path) if path.is_dir() else {path}
    for gen in k.get("configMapGenerator", []):
        used |= {(directory / f.partition("=")[2] if "=" in f else directory / f).resolve()
                 for f in gen.get("files", [])}
    return {p.resolve() for p in used}


def render(directory: Path) -> list[dict]:
    """The resources `kubectl kustomize directory` would print (for the features listed above)."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = sorted(set(k) - SUPPORTED)
    assert not unknown, f"{directory}/kustomization.yaml uses {unknown}, which tests/k8s/kustomize.py does not render"
    docs: list[dict] = []
    for res in k.get("resources", []):
        path = directory / res
        docs += render(path) if path.is_dir() else copy.deepcopy(load_docs(path))
    if k.get("configMapGenerator"):
        assert k.get("generatorOptions", {}).get("disableNameSuffixHash") is True, \
            "generated names with a hash suffix are not rendered here: set disableNameSuffixHash"
    for gen in k.get("configMapGenerator", []):
        data = {}
        for literal in gen.get("literals", []):
            key, _, value = literal.partition("=")
            data[key] = value
        for spec in gen.get("files", []):
            key, _, source = spec.partition("=") if "=" in spec else (Path(spec).name, "", spec)
            data[key] = (directory / source).read_text()
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    for patch in k.get("patches", []):
        target, ops = patch["target"], yaml.safe_load(patch["patch"])
        hits = [d for d in docs if d["kind"] == target["kind"] and d["metadata"].get("name") == target.get("name")]
        assert hits, f"{directory}: patch target {target} matches no resource"
        for doc in hits:
            for op in ops:
                _apply(doc, op)
    for image in k.get("images", []):
        for doc in docs:
            _set_images(doc, image)
    for rep in k.get("replacements", []):
        src = rep["source"]
        source = next(d for d in docs if d["kind"] == src["kind"] and d["metadata"]["name"] == src["name"])
        value = _get(source, src["fieldPath"].split("."))
        for target in rep["targets"]:
            sel = target["select"]
            for doc in docs:
                if doc["kind"] == sel["kind"] and sel.get("name", doc["metadata"].get("name")) == \
                        doc["metadata"].get("name"):
                    for field_path in target["fieldPaths"]:
                        *parents, leaf = field_path.split(".")
                        holder = _get(doc, parents)
                        assert leaf in holder, f"replacement target {field_path} is missing in {doc['kind']}"
                        holder[leaf] = value
    if "namespace" in k:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = k["namespace"]
    return docs


def _get(obj: Any, keys: list[str]) -> Any:
    for key in keys:
        obj = obj[int(key)] if isinstance(obj, list) else obj[key]
    return obj


def _apply(doc: dict, op: dict) -> None:
    """One JSON 6902 operation (add, replace, remove) at a JSON pointer."""
    keys = [k.replace("~1", "/").replace("~0", "~") for k in op["path"].split("/")[1:]]
    parent, leaf = _get(doc, keys[:-1]), keys[-1]
    if isinstance(parent, list):
        index = len(parent) if leaf == "-" else int(leaf)
        if op["op"] == "add":
            parent.insert(index, op["value"])
        elif op["op"] == "replace":
            parent[index] = op["value"]
        else:
            del parent[index]
        return
    assert op["op"] == "add" or leaf in parent, f"patch {op}: {op['path']} does not exist"
    if op["op"] == "remove":
        del parent[leaf]
    else:
        parent[leaf] = op["value"]


def _set_images(node: Any, image: dict) -> None:
    """kustomize's images transformer: every `image` of an entry in a containers/initContainers list."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    name = container.get("image", "").split("@")[0].rsplit(":", 1)[0]
                    if name == image["name"]:
                        new = image.get("newName", name)
                        new += f":{image['newTag']}" if "newTag" in image else ""
                        new += f"@{image['digest']}" if "digest" in image else ""
                        container["image"] = new
            _set_images(value, image)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, image)
