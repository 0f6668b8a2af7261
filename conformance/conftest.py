"""Loads the suite's pytest hooks (:mod:`dshal_conformance.pytest_plugin`) when pytest collects
``conformance/`` from a checkout. With an installed wheel, load them explicitly instead:
``pytest -p dshal_conformance.pytest_plugin --pyargs dshal_conformance --dshal-backend NAME``
(then this file must not register them a second time)."""

import sys

if "dshal_conformance.pytest_plugin" not in sys.modules:  # not loaded by -p
    from dshal_conformance.pytest_plugin import (  # noqa: F401
        conformance_runner,
        pytest_addoption,
        pytest_generate_tests,
    )
