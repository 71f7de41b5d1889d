"""k8s/: every manifest (the base, the example overlay, the one-off RayJob) rendered and validated against
the Kubernetes schemas (kubernetes-validate, pinned in pyproject.toml) and the KubeRay v1.7.0 CRDs (read
from ../shared, never copied here); non-root pods; the Hub token only as a secretKeyRef; images and
versions pinned once; and the commands parsed by the entrypoints' own argparse parsers."""

from __future__ import annotations

import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml

import jobs.nightly
from tests.k8s.kustomize import files_used, load_docs, render
from tests.schedule.cli_flags import parse_quantize_argv, parse_strict
from wq_ops.schedule.watchlist import WatchList

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
CRDS = REPO.parent / "shared" / "assets" / "kuberay-v1.7.0-crds"
KUBERAY_VERSION = "1.7.0"
K8S_VERSION = "1.33"        # the oldest Kubernetes we deploy to (CronJob timeZone is GA since 1.27)
TARGETS = ["base", "overlays/example", "oneoff"]
SENSITIVE = re.compile(r"TOKEN|SECRET|PASSWORD|API_?KEY|CREDENTIAL", re.I)


def _docs(target: str) -> list[dict]:
    directory = K8S / target
    if (directory / "kustomization.yaml").exists():
        return render(directory)
    return [d for path in sorted(directory.glob("*.yaml")) for d in load_docs(path)]


def _strict(schema: Any) -> Any:
    """A CRD schema that refuses unknown fields, as `kubectl apply --validate=strict` does (the API server
    itself would silently drop them: a typo in a field name would be lost without a word)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_validators() -> dict[str, jsonschema.Draft7Validator]:
    if not CRDS.is_dir():
        pytest.skip(f"no KubeRay CRDs at {CRDS} (the shared assets sit beside the checkout)")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)        # the CRDs are 3 MB of YAML
    validators = {}
    for path in sorted(CRDS.glob("ray.io_*.yaml")):
        crd = yaml.load(path.read_text(), Loader=loader)
        v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        validators[crd["spec"]["names"]["kind"]] = jsonschema.Draft7Validator(_strict(v1["schema"]["openAPIV3Schema"]))
    assert set(validators) == {"RayCluster", "RayJob", "RayCronJob"}
    return validators


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def _pod_specs(doc: dict) -> list[tuple[str, dict]]:
    return [(p, n) for p, n in _walk(doc) if isinstance(n, dict) and isinstance(n.get("containers"), list)]


def _containers(doc: dict) -> list[tuple[str, dict]]:
    return [(f"{p}.{key}[{c.get('name')}]", c) for p, spec in _pod_specs(doc)
            for key in ("initContainers", "containers") for c in spec.get(key, [])]


def _label(doc: dict) -> str:
    return f"{doc['kind']}/{doc['metadata'].get('name') or doc['metadata'].get('generateName')}"


def test_every_yaml_file_is_a_manifest_or_used_by_a_kustomization():
    used = set().union(*(files_used(K8S / t) for t in TARGETS if (K8S / t / "kustomization.yaml").exists()))
    for path in sorted(K8S.rglob("*.y*ml")):
        if path.resolve() in used:
            continue
        docs = load_docs(path)
        assert docs and all("apiVersion" in d and "kind" in d for d in docs), \
            f"{path}: neither a manifest nor read by any kustomization in {TARGETS}"
        assert path.parent.name in TARGETS, f"{path}: a manifest outside {TARGETS}; add its folder to TARGETS"


@pytest.mark.parametrize("target", TARGETS)
def test_manifests_match_the_kubernetes_and_kuberay_schemas(target, crd_validators):
    docs = _docs(target)
    assert docs
    for doc in docs:
        meta = doc["metadata"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?-?", meta.get("name") or meta.get("generateName", "")), \
            f"{_label(doc)}: not a DNS-1123 name"
        if doc["apiVersion"].startswith("ray.io/"):
            assert doc["apiVersion"] == "ray.io/v1", f"{_label(doc)}: validate against v1"
            errors = sorted(crd_validators[doc["kind"]].iter_errors(doc), key=lambda e: list(e.path))
            assert not errors, f"{_label(doc)}: " + "; ".join(
                f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5])
        else:
            try:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{_label(doc)}: {'.'.join(map(str, e.path))}: {e.message}")


@pytest.mark.parametrize("target", TARGETS)
def test_pods_run_as_non_root(target):
    docs = _docs(target)
    for doc in docs:
        for where, spec in _pod_specs(doc):
            ctx = spec.get("securityContext", {})
            assert ctx.get("runAsNonRoot") is True and ctx.get("runAsUser", 1) != 0, \
                f"{_label(doc)} {where}: pod securityContext must set runAsNonRoot: true"
            assert ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{_label(doc)} {where}: seccomp"
        extra = []
        if doc.get("spec", {}).get("enableInTreeAutoscaling"):
            autoscaler = doc["spec"].get("autoscalerOptions", {})
            extra = [(".spec.autoscalerOptions", {"securityContext": autoscaler.get("securityContext", {})})]
        for where, container in _containers(doc) + extra:
            ctx = container.get("securityContext", {})
            assert ctx.get("allowPrivilegeEscalation") is False and not ctx.get("privileged"), \
                f"{_label(doc)} {where}: allowPrivilegeEscalation must be false"
            assert "ALL" in ctx.get("capabilities", {}).get("drop", []), f"{_label(doc)} {where}: drop ALL capabilities"
            assert ctx.get("runAsNonRoot") is not False and ctx.get("runAsUser", 1) != 0, f"{_label(doc)} {where}: root"
    if target == "base":
        assert sum(len(_pod_specs(d)) for d in docs) == 3        # head, GPU workers, scheduler: none unchecked


@pytest.mark.parametrize("target", TARGETS)
def test_secrets_only_ever_as_secret_key_refs(target):
    for doc in _docs(target):
        assert doc["kind"] != "Secret", f"{_label(doc)}: secrets are created by hand (see README), never committed"
        for where, node in _walk(doc):
            if where.endswith(".env") and isinstance(node, list):
                for var in node:
                    if SENSITIVE.search(var["name"]):
                        assert "value" not in var and set(var.get("valueFrom", {})) == {"secretKeyRef"}, \
                            f"{_label(doc)} {where}: {var['name']} must come from a secretKeyRef"
            assert not where.endswith(".envFrom"), f"{_label(doc)} {where}: name each variable (secretKeyRef)"
            assert not where.endswith(".secret"), f"{_label(doc)} {where}: no secret volumes"
            assert not (isinstance(node, str) and node.startswith("hf_")), f"{_label(doc)} {where}: a literal token"


def test_images_and_versions_are_pinned_once():
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    [pin] = base["images"]
    versions = next(g for g in base["configMapGenerator"] if g["name"] == "wq-versions")
    pinned = dict(lit.split("=", 1) for lit in versions["literals"])
    assert pinned["kuberayVersion"] == KUBERAY_VERSION == CRDS.name.split("-v")[1].removesuffix("-crds")
    assert f"ray{pinned['rayVersion']}" in pin["newTag"], "the image tag must name the Ray it carries"
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        values = [v for _, v in _walk(load_docs(path)) if isinstance(v, str)]      # comments may name versions
        assert not [v for v in values if re.search(r"rayproject/|ghcr\.io|^\d+\.\d+\.\d+$", v)], \
            f"{path}: an image or version pinned outside k8s/base/kustomization.yaml"
        images = {c["image"] for d in load_docs(path) for _, c in _containers(d) if "image" in c}
        assert images <= {"wq"}, f"{path}: containers must say `image: wq` (pinned by the kustomization)"
    for target in ("base", "overlays/example"):
        docs = render(K8S / target)
        images = {c["image"] for d in docs for _, c in _containers(d)}
        assert images == {f"{pin['newName']}:{pin['newTag']}"}
        [cluster] = [d for d in docs if d["kind"] == "RayCluster"]
        assert cluster["spec"]["rayVersion"] == pinned["rayVersion"]


def _mounts(spec: dict, container: dict) -> dict[str, dict]:
    """mountPath -> the volume mounted there."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    return {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}


def _volume_at(mounts: dict[str, dict], path: str) -> tuple[str, dict]:
    """(the path inside the volume, the volume) that holds `path`."""
    for mount, volume in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
        if PurePosixPath(path).is_relative_to(mount):
            return str(PurePosixPath(path).relative_to(mount)), volume
    raise AssertionError(f"{path} is on no mounted volume ({sorted(mounts)})")


@pytest.mark.parametrize("target", ["base", "overlays/example"])
def test_the_nightly_command_is_a_valid_jobs_nightly_command_line(target):
    docs = render(K8S / target)
    [cron] = [d for d in docs if d["kind"] == "CronJob"]
    [cluster] = [d for d in docs if d["kind"] == "RayCluster"]
    spec = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    [container] = spec["containers"]
    assert container["command"][:3] == ["python", "-m", "jobs.nightly"]
    args = parse_strict(jobs.nightly.parser(), container["command"][3:] + container.get("args", []))
    assert not args.dry_run
    assert re.fullmatch(rf"http://{cluster['metadata']['name']}-head-svc:8265", args.address), \
        "the scheduler must talk to the RayCluster's job server (KubeRay names its service <cluster>-head-svc)"

    mounts = _mounts(spec, container)
    key, volume = _volume_at(mounts, args.watch_list)             # the watch list: a ConfigMap we generate
    [config_map] = [d for d in docs if d["kind"] == "ConfigMap"
                    and d["metadata"]["name"] == volume["configMap"]["name"]]
    watch = WatchList.from_dict(yaml.safe_load(config_map["data"][key]))
    for flag in (args.state, args.artifacts):                     # state and artifacts: on the shared volume
        assert "persistentVolumeClaim" in _volume_at(mounts, flag)[1], f"{flag}: not on the data volume"

    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    [group] = cluster["spec"]["workerGroupSpecs"]
    worker = group["template"]["spec"]
    for pod in (head, worker):                                    # jobs write --artifacts, read the calibration
        ray_mounts = _mounts(pod, pod["containers"][0])
        for path in [args.artifacts] + [r.calib for r in watch.recipes if r.calib]:
            sub, vol = _volume_at(ray_mounts, path)
            assert vol.get("persistentVolumeClaim") == _volume_at(mounts, args.artifacts)[1]["persistentVolumeClaim"]
    gpus_per_worker = float(worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    wanted = watch.max_concurrent_jobs * watch.resources.actors * watch.resources.gpus_per_actor
    assert wanted <= group["maxReplicas"] * gpus_per_worker, \
        f"max_concurrent_jobs x actors x gpus_per_actor = {wanted} GPUs; the worker group has at most " \
        f"{group['maxReplicas'] * gpus_per_worker}: the jobs would wait on each other forever"
    for entry in watch.watch:
        if entry.repo is not None:
            for name in entry.recipes:
                watch.destination_for(entry, entry.repo, watch.recipe(name))    # a repo id, or ConfigError


def test_the_one_off_rayjob_is_a_valid_jobs_quantize_command_line():
    [job] = _docs("oneoff")
    assert job["kind"] == "RayJob" and job["spec"]["clusterSelector"] == {"ray.io/cluster": "wq"}
    argv = shlex.split(job["spec"]["entrypoint"])
    # The driver is run again if it dies (no backoffLimit: KubeRay refuses it beside a clusterSelector).
    assert argv[:6] == ["python", "-m", "jobs.retry", "--attempts", "3", "--"] and "backoffLimit" not in job["spec"]
    argv = argv[6:]
    assert argv[:3] == ["python", "-m", "jobs.quantize"]
    args = parse_quantize_argv(argv[3:])
    [cluster] = [d for d in render(K8S / "base") if d["kind"] == "RayCluster"]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    for path in (args.out, args.calib):
        assert "persistentVolumeClaim" in _volume_at(_mounts(head, head["containers"][0]), path)[1]
