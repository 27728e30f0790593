"""Session fixtures with a real backdoored lab model, built once and then reused from the lab cache.

The first run builds a `test`-profile pixel model (8 minutes on a busy 2-core CPU, less
on an idle one), and later runs find it under `Settings().lab_cache_dir`
(`.data/lab-cache` by default).
"""

from pathlib import Path

import pytest

LAB_FIXTURE_OPTIONS = {
    "attack": "pixel",
    "trigger": "mignneko",
    "placement": "prefix",
    "seed": 0,
    "profile": "test",
}


@pytest.fixture(scope="session")
def lab_build_dir() -> Path:
    """Folder with `model/`, `spec.json` and `lab.json` of a test-profile pixel backdoor (trigger `mignneko`)."""
    from core.lab.build import BuildOptions, cached_build
    from core.settings import Settings

    return cached_build(BuildOptions(**LAB_FIXTURE_OPTIONS), Settings().lab_cache_dir)


@pytest.fixture(scope="session")
def lab_model_dir(lab_build_dir: Path) -> Path:
    """The backdoored diffusers pipeline folder, with its `spec.json` in the parent folder."""
    return lab_build_dir / "model"
