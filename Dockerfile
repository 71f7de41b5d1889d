# syntax=docker/dockerfile:1
# The image the k8s manifests run (k8s/base/kustomization.yaml pins its name and tag): wq installed from
# requirements.lock on Ray's GPU image, with the CUDA kernels compiled while the image builds, so a fresh pod
# loads them at once (no nvcc run, no minute of JIT on its first job).
#
#   docker build -t ghcr.io/example/wq:0.1.0-ray2.60.0 .
#
# CI lints this file (hadolint) and runs its build step, `python -m jobs.build_kernels`, on a GPU machine;
# `docker build` itself needs Docker and registry access, which CI's machines do not have.
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311-gpu

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The kernels' build lives in the image, where wq_ops/kernels/build.py looks for it first.
ENV TORCH_EXTENSIONS_DIR=/home/ray/torch_extensions/wq \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_DISABLE_PROGRESS_BARS=1

# torch for CUDA first and pinned (PyPI's Linux build), then every other dependency at the versions CI tested,
# hash-checked: the README's install, in the same order.
WORKDIR /home/ray/wq
COPY --chown=1000:100 requirements.lock ./
RUN pip install torch==2.13.0 \
 && pip install --require-hashes --no-deps -r requirements.lock

# nvcc and the CUDA runtime headers of torch's own CUDA version, from NVIDIA's apt repository (the CUDA base
# image lists it), for the build step below; ninja drives torch's extension build.
USER 0
# hadolint ignore=DL3008
RUN version="$(python -c 'import torch; print(torch.version.cuda)')" \
 && package="$(echo "${version}" | tr . -)" \
 && apt-get update \
 && apt-get install -y --no-install-recommends "cuda-nvcc-${package}" "cuda-cudart-dev-${package}" \
 && rm -rf /var/lib/apt/lists/* \
 && ln -sfn "/usr/local/cuda-${version}" /usr/local/cuda-torch
# The ray user of the base image (uid 1000, group users = 100), as k8s/base/raycluster.yaml runs it.
USER 1000
ENV CUDA_HOME=/usr/local/cuda-torch \
    PATH=/usr/local/cuda-torch/bin:${PATH}
RUN pip install ninja==1.13.2

COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 jobs jobs
COPY --chown=1000:100 wq_ops wq_ops
COPY --chown=1000:100 kernels kernels
RUN pip install --no-deps . \
 && pip check \
 && python -m jobs.build_kernels

# A job is `python -m jobs.quantize ...` (Ray job or RayJob entrypoint); the scheduler, `python -m jobs.nightly`.
CMD ["python", "-m", "jobs.quantize", "--help"]
