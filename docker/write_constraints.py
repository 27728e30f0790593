"""Write docker/constraints.txt: the exact versions of Sealer's dependencies in this environment.

The images install `pip install -c docker/constraints.txt .`, so they get the versions
the test suite ran with instead of whatever is newest on the day of the build. Run it
from the repository root with the project's virtual environment after changing
dependencies:

    .venv/bin/python docker/write_constraints.py

torch is left out: the worker image installs its CUDA build separately, pinned in
docker/worker.Dockerfile, and the API image has none.
"""

import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = Path(__file__).resolve().parent.parent
OUTPUT = REPO_ROOT / "docker" / "constraints.txt"
EXTRAS = ("engine",)
LEFT_OUT = {"torch"}

HEADER = """\
# Exact versions of Sealer's dependencies (base and `engine` extra), as installed where the
# test suite passed. Written by docker/write_constraints.py; do not edit by hand.
"""


def project_requirements() -> list[Requirement]:
    """Return the base requirements and those of EXTRAS from pyproject.toml."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in EXTRAS:
        lines.extend(project["optional-dependencies"][extra])
    return [Requirement(line) for line in lines]


def installed_closure(roots: list[Requirement]) -> dict[str, str]:
    """Return {name: installed version} for `roots` and everything they need, markers applied."""
    versions: dict[str, str] = {}
    expanded: set[tuple[str, frozenset[str]]] = set()
    pending: list[tuple[Requirement, frozenset[str]]] = [(requirement, frozenset()) for requirement in roots]

    while pending:
        requirement, parent_extras = pending.pop()
        if requirement.marker is not None:
            extras_in_effect = parent_extras or frozenset({""})
            if not any(requirement.marker.evaluate({"extra": extra}) for extra in extras_in_effect):
                continue

        name = canonicalize_name(requirement.name)
        try:
            distribution = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            sys.exit(f"{requirement.name} is required but not installed; install the project's dependencies first")
        versions[name] = distribution.version

        extras = frozenset(requirement.extras)
        if (name, extras) in expanded:
            continue
        expanded.add((name, extras))
        for child in distribution.requires or []:
            pending.append((Requirement(child), extras))

    return versions


def main() -> None:
    versions = installed_closure(project_requirements())
    lines = [f"{name}=={version}" for name, version in sorted(versions.items()) if name not in LEFT_OUT]
    OUTPUT.write_text(HEADER + "\n".join(lines) + "\n")
    print(f"wrote {len(lines)} pins to {OUTPUT.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
