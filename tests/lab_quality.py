"""Marks the tests that need the lab fixture's backdoor to be strong and trigger-specific.

Loaded with `-p tests.lab_quality`. These tests assert what a working backdoor and its
removal look like (attack success before well above clean false positives, a fall after
sealing, recognisable digits). `make test` runs them; `-m "not lab_quality"` skips them
when the lab fixture is being changed.
"""

import pytest

LAB_QUALITY_TESTS = (
    "tests/test_seal_e2e.py::test_seal_lowers_attack_success",
    "tests/test_seal_e2e.py::test_seal_keeps_clean_images",
    "tests/test_sampling.py::test_guided_50_steps_not_worse_than_10",
    "tests/test_lab.py::test_build_backdoor_measurable",
    "tests/test_lab.py::test_build_sampled_backdoor",
    "tests/test_e2e_service.py::test_embedded_serve_end_to_end",
    "tests/test_e2e_service.py::test_production_end_to_end",
)


def pytest_configure(config):
    config.addinivalue_line("markers", "lab_quality: needs a strong, trigger-specific backdoor in the lab fixture")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.split("[")[0] in LAB_QUALITY_TESTS:
            item.add_marker(pytest.mark.lab_quality)
