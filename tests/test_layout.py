"""The package layout is the architecture: imports point one way, and nothing is a grab bag."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The layout section of ../shared/STYLE.md, lowest tier first:
#   jobs -> (api, schedule) -> cluster -> (block, device, evaluate) -> calib -> (model, io, formats, report, bundled)
#   -> (quant, pack) -> wq_ops.kernels -> (config, errors) -> wq_ops/__init__
# A package imports only from lower tiers; packages of one tier do not import each other. One step apart from
# STYLE.md: config raises ConfigError, so errors sits one tier below config rather than beside it.
ORDER: list[tuple[str, ...]] = [
    ("wq_ops.__init__",),                   # holds only __version__
    ("wq_ops.errors",),
    ("wq_ops.config",),
    ("wq_ops.kernels",),
    ("wq_ops.quant", "wq_ops.pack"),
    ("wq_ops.model", "wq_ops.io", "wq_ops.formats", "wq_ops.report", "wq_ops.bundled"),
    ("wq_ops.calib",),
    ("wq_ops.block", "wq_ops.device", "wq_ops.evaluate"),
    ("wq_ops.cluster",),
    ("wq_ops.api", "wq_ops.schedule"),
    ("jobs",),
]
TIERS = {unit: tier for tier, units in enumerate(ORDER) for unit in units}


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
                if TIERS[other] > TIERS[me]:
                    bad.append(f"{module_name(path)} imports {imported} (a higher tier)")
                elif TIERS[other] == TIERS[me]:
                    bad.append(f"{module_name(path)} imports {imported} (its own tier: {me} and {other})")
    assert not bad, "\n".join(bad)


def test_no_grab_bag_modules():
    names = {p.name for top in ("wq_ops", "jobs") for p in (REPO / top).rglob("*.py")}
    assert not names & {"utils.py", "helpers.py", "common.py", "misc.py"}
