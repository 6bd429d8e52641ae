"""FedProx on Flower's deployment engine: a real SuperLink and two real SuperNodes on loopback, started
through fedpath's own commands (`fedpath server start`, `fedpath site start`, `fedpath run`)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedpath.common.runconfig import RunConfig
from fedpath.common.wire import arrays_nbytes
from fedpath.server import flower_runtime as fr
from fedpath.server.federation import initial_weights
from fedpath.server.runfolder import RunFolder, load_model
from tests.federation_helpers import held_out_by_site, make_cohort, mean_auroc, mean_loss

pytestmark = pytest.mark.slow

FEDPATH = str(Path(sys.executable).parent / "fedpath")


@pytest.fixture
def federation_deployment(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A SuperLink and one SuperNode per site of a two-site cohort; everything stopped afterwards."""
    manifest = make_cohort(tmp_path / "cohort", sites=2, slides=48, shift=0.5)
    port, local_port = fr.free_port(), fr.free_port()
    started: list[fr.FlowerProcess] = []
    try:
        link = fr.start_process(
            [
                FEDPATH,
                "server",
                "start",
                "--insecure",
                "--port",
                str(port),
                "--local-port",
                str(local_port),
                "--flwr-home",
                str(tmp_path / "link"),
            ],
            tmp_path / "link",
            tmp_path / "link.out",
        )
        started.append(link)
        fr.wait_healthy(f"127.0.0.1:{local_port}", link.process, link.log_file)
        fr.wait_healthy(f"127.0.0.1:{port}", link.process, link.log_file)
        for site in ("site-A", "site-B"):
            home = tmp_path / site
            cmd = [FEDPATH, "site", "start", "--superlink", f"127.0.0.1:{port}", "--insecure"]
            cmd += [
                "--allow-unsigned-apps"
            ]  # this test's runs are unsigned (tests/test_deploy_federation signs)
            cmd += ["--manifest", str(manifest), "--site", site, "--port", str(fr.free_port())]
            started.append(fr.start_process([*cmd, "--flwr-home", str(home)], home, tmp_path / f"{site}.out"))
        yield manifest, f"127.0.0.1:{local_port}"  # `fedpath run` talks to the SuperLink itself
    finally:
        for process in reversed(started):
            process.stop()


def test_two_supernodes_train_two_fedprox_rounds(
    federation_deployment: tuple[Path, str], tmp_path: Path
) -> None:
    manifest, address = federation_deployment
    out = tmp_path / "run"
    cmd = [FEDPATH, "run", "--superlink", address, "--insecure", "--out", str(out), "--sites", "2"]
    cmd += ["--in-dim", "16", "--rounds", "2", "--local-epochs", "3", "--lr", "0.01", "--mu", "0.01"]
    cmd += ["--min-sites", "2"]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env=fr.flower_env(tmp_path / "cli-home")
    )
    assert done.returncode == 0, (
        done.stdout + done.stderr + "\n".join(p.read_text()[-3000:] for p in tmp_path.glob("*.out"))
    )
    assert "completed" in done.stdout

    folder = RunFolder(out)
    assert folder.checkpoint_rounds() == [1, 2]
    lines = folder.read_rounds()
    assert [line["round"] for line in lines] == [1, 2]
    assert all(sorted(line["sites"]) == ["site-A", "site-B"] for line in lines)
    assert folder.card_md.exists() and folder.model.exists()

    model, ckpt = load_model(folder.model)
    run = RunConfig.model_validate(ckpt.config)
    start = model.__class__(in_dim=16, num_classes=2)
    start.load_state_dict(initial_weights(run))
    before = held_out_by_site(start.eval(), manifest, run)
    after = held_out_by_site(model, manifest, run)
    assert mean_auroc(after) > mean_auroc(before), (before, after)
    assert mean_loss(after) < mean_loss(before), (before, after)

    # what a site sends per round: the fp32 weights plus a small envelope
    from fedpath.common.wire import model_to_arrays

    fp32 = arrays_nbytes(model_to_arrays(model))
    for line in lines:
        for site in line["sites"].values():
            assert fp32 <= site["bytes_received"] <= 1.1 * fp32
