"""The package layout is the architecture: imports point one way, and nothing is a grab bag."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Lower tiers never import higher ones. Within a tier, a package imports only itself.
TIERS = {
    "wq_ops.__init__": 0,  # the package itself holds only __version__
    "wq_ops.errors": 1,
    "wq_ops.kernels": 2, "wq_ops.config": 2,
    "wq_ops.quant": 3, "wq_ops.pack": 3,
    "wq_ops.model": 4, "wq_ops.formats": 4, "wq_ops.io": 4, "wq_ops.evaluate": 4, "wq_ops.bundled": 4,
    "wq_ops.report": 4,
    "wq_ops.calib": 5, "wq_ops.device": 5,
    "wq_ops.cluster": 6, "wq_ops.schedule": 6,
    "jobs": 7,
}


def unit_of(module: str) -> str | None:
    for unit in sorted(TIERS, key=len, reverse=True):
        if module == unit or module.startswith(unit + "."):
            return unit
    return None


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
    return name if name == "wq_ops.__init__" else name.removesuffix(".__init__")


def test_imports_point_one_way():
    bad = []
    for top in ("wq_ops", "jobs"):
        for path in (REPO / top).rglob("*.py"):
            me = unit_of(module_name(path))
            assert me is not None, f"{path} belongs to no tier: add its package to TIERS"
            for imported in imports_of(path):
                other = unit_of(imported)
                if imported == "wq_ops":
                    other = "wq_ops.__init__"
                if other is None or other == me:
                    continue
                if TIERS[other] >= TIERS[me]:
                    bad.append(f"{module_name(path)} imports {imported}")
    assert not bad, "\n".join(bad)


def test_no_grab_bag_modules():
    names = {p.name for top in ("wq_ops", "jobs") for p in (REPO / top).rglob("*.py")}
    assert not names & {"utils.py", "helpers.py", "common.py", "misc.py"}
