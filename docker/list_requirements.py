"""Print the requirements of pyproject.toml, base first, then those of the extras named as arguments.

The Dockerfiles install these (with docker/constraints.txt) before copying the source,
so that a code change does not reinstall every dependency.

    python docker/list_requirements.py engine > requirements.txt
"""

import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def main(extras: list[str]) -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        known = project.get("optional-dependencies", {})
        if extra not in known:
            sys.exit(f"unknown extra {extra!r} in {PYPROJECT}; known: {', '.join(sorted(known))}")
        lines.extend(known[extra])
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
