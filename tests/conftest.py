"""Fixtures shared by several test modules."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

# Modules whose tests share an expensive module-scoped fixture (a simulated federation, a DP federation run and
# resumed, a TLS SuperLink, extracted slides, a report's run): under `make test`'s two workers each of these
# modules runs in one worker, so its fixture is built once; dealt test by test, both workers built it. Other
# tests are still dealt one by one, so the deployment scenarios (mostly waiting on Flower) overlap on two workers.
ONE_WORKER_MODULES = frozenset(
    f"tests/{name}.py"
    for name in (
        "test_federation_simulation",
        "test_privacy_federation",
        "test_report",
        "test_deploy",
        "test_extract",
        "test_predict",
        "test_heatmaps",
    )
)


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """pytest-xdist's scheduling by scope, a scope being a whole module for `ONE_WORKER_MODULES` and a single test
    otherwise. (xdist's own `--dist loadgroup` does not group under pytest 9.2: it renames items through an
    attribute that pytest no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ModulesThatShareFixtures(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in ONE_WORKER_MODULES else nodeid

    return ModulesThatShareFixtures(config, log)


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Flower's ClientApp dispatch needs a task identity outside a SuperNode."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One Ray head node for the simulations of the test session (Flower attaches to it by RAY_ADDRESS, as it
    would to a user's Ray cluster): each simulated federation still starts its own SuperLink, simulation
    process and ClientApp actors, but not a Ray instance of its own."""
    import tempfile

    from fedpath.server.flower_runtime import ray_agents, start_ray_head, stop_ray_agents

    temp = Path(tempfile.mkdtemp(prefix="fedpath-ray-"))
    head = start_ray_head(tmp_path_factory.mktemp("ray-head"), temp)
    try:
        yield head.address
    finally:
        agents = ray_agents(head)
        head.stop(grace=1.0)
        stop_ray_agents(agents)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def shared_ray(ray_head: str) -> Iterator[None]:
    """Simulations in the module (in-process or in a `fedpath` subprocess) attach to the session's Ray head."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_ADDRESS", ray_head)
        yield
