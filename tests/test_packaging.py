"""Install hygiene: no top-level import name of ours is one a dependency owns, and a wheel ships the CUDA
sources as wq_ops package data, never as a top-level `kernels` (Hugging Face's import name, which
transformers 5.25 requires and imports)."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = {"wq_ops", "jobs"}                 # the top-level packages the wheel installs


def run_python(code: str, cwd: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, *args, "-c", code], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


@pytest.mark.parametrize("where", ["checkout", "elsewhere"])
def test_import_kernels_is_huggingfaces_from_anywhere(where, tmp_path):
    # `python -c` puts the working directory first on sys.path, as `python -m jobs.quantize` does.
    cwd = REPO if where == "checkout" else tmp_path
    path = run_python("import kernels; print(kernels.__file__)", cwd)
    dist = importlib.metadata.distribution("kernels")       # installed with transformers (and by our test extra)
    assert Path(path).resolve() == Path(str(dist.locate_file("kernels/__init__.py"))).resolve()
    assert Path(path).resolve().parent != (REPO / "kernels").resolve()      # not our CUDA sources' folder


def test_transformers_model_classes_import_beside_wq():
    code = ("import jobs.quantize, wq_ops.cluster.driver, wq_ops.kernels.build, wq_ops.quant.gptq\n"
            "import transformers.modeling_utils\n"
            "from transformers import LlamaForCausalLM\n"
            "from transformers.utils.import_utils import is_kernels_available\n"
            "import kernels\n"
            "print(is_kernels_available(), LlamaForCausalLM.__name__, hasattr(kernels, 'kernelize'))")
    assert run_python(code, REPO) == "True LlamaForCausalLM True"


def test_no_top_level_name_of_ours_belongs_to_another_distribution():
    owners = importlib.metadata.packages_distributions()
    for name in OURS:
        assert set(owners.get(name, [])) <= {"wq"}, f"top-level {name!r} is also installed by {owners[name]}"
    assert set(owners.get("kernels", [])) == {"kernels"}, owners.get("kernels")
    assert not list((REPO / "kernels").rglob("*.py")), "kernels/ holds CUDA sources only: Python goes in wq_ops"


def test_the_wheel_ships_every_source_under_wq_ops(tmp_path):
    # Built from a copy: setuptools writes build/ and *.egg-info into the tree it builds.
    tree = tmp_path / "tree"
    for name in ("jobs", "wq_ops", "kernels"):
        shutil.copytree(REPO / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, tree / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(tmp_path / "wheel"), str(tree)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = (tmp_path / "wheel").glob("wq-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")
    assert {n.split("/")[0] for n in names if "/" in n and ".dist-info/" not in n} == OURS
    want = {str(p.relative_to(REPO)) for top in OURS for p in (REPO / top).rglob("*.py")}
    want |= {str(p.relative_to(REPO)) for p in (REPO / "wq_ops" / "bundled" / "text").glob("*.txt")}
    cuda = {p for p in (REPO / "kernels").rglob("*") if p.is_file()}
    want |= {"wq_ops/kernels/sources/" + str(p.relative_to(REPO / "kernels")) for p in cuda}
    assert not want - names, f"missing from the wheel (add the package to pyproject.toml): {sorted(want - names)}"
    # -S: no site-packages and no editable finder, so only the unpacked wheel can answer.
    site = str(tmp_path / "site")
    code = f"import sys; sys.path.insert(0, {site!r}); from wq_ops.kernels import build; print(build.ROOT)"
    root = Path(run_python(code, tmp_path, "-S"))
    assert root == tmp_path / "site" / "wq_ops" / "kernels" / "sources"
    assert {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} == \
        {str(p.relative_to(REPO / "kernels")) for p in cuda}
