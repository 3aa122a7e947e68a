"""Print ``name==floor`` for each ``name>=floor`` dependency in pyproject.toml: pip constraints that install the
declared minimum versions (CI's minimum-versions stage). Names given as arguments are left out (e.g. ``torch``,
whose old CPU builds are not on PyPI)."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path


def main(skip: list[str]) -> None:
    deps = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    for req in deps["dependencies"]:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][A-Za-z0-9.]*)\s*", req)
        if m and m.group(1).lower() not in skip:
            print(f"{m.group(1)}=={m.group(2)}")


if __name__ == "__main__":
    main([s.lower() for s in sys.argv[1:]])
