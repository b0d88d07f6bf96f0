"""One local Ray cluster (2 CPUs) for every Ray test: started once, stopped at the end.

Without Ray installed the Ray tests are skipped, except in CI (``CI`` set), where the extra must
be installed (``make test`` installs it) and a missing Ray fails the run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[ModuleType]:
    if os.environ.get("CI"):
        import ray
    else:
        ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # the workers import this folder's test modules (functions sent by reference) and the package
    here = Path(__file__).resolve().parent
    paths = [str(here), str(here.parent), str(here.parents[1] / "src")]
    paths.append(os.environ.get("PYTHONPATH", ""))
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}},
    )
    yield ray
    ray.shutdown()
