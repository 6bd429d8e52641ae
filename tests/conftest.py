"""Fixtures shared by several test modules."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest


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
