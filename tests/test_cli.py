import argparse
import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fedpath.common.cli import build_parser, discover_commands
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]


def _all_command_paths() -> list[list[str]]:
    """Every command and nested subcommand reachable from `fedpath`, e.g. ['manifest', 'check']."""
    parser = build_parser(discover_commands())
    paths: list[list[str]] = []

    def walk(p: argparse.ArgumentParser, prefix: list[str]) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    paths.append([*prefix, name])
                    walk(sub, [*prefix, name])

    walk(parser, [])
    return paths


def test_commands_are_discovered() -> None:
    names = {c.name for c in discover_commands()}
    assert {"manifest", "synth", "demo"} <= names


@pytest.mark.parametrize("path", _all_command_paths(), ids=lambda p: " ".join(p))
def test_every_command_has_help(path: list[str]) -> None:
    result = run_cli(*path, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: fedpath " + " ".join(path))
    assert len(result.stdout.splitlines()) < 60, "help should fit on a screen"


def test_synth_then_check(tmp_path: Path) -> None:
    out = tmp_path / "cohort"
    made = run_cli(
        "synth", "--out", str(out), "--sites", "2", "--slides", "20", "--dim", "4", "--tiles-median", "8"
    )
    assert made.returncode == 0, made.stderr
    assert str(out / "manifest.csv") in made.stdout
    check = run_cli("manifest", "check", str(out / "manifest.csv"))
    assert check.returncode == 0 and "site-A" in check.stdout and "site-B" in check.stdout
    bad = run_cli("synth", "--out", str(tmp_path / "x"), "--sites", "9", "--slides", "10")
    assert bad.returncode == 2 and "too few for 9 sites" in bad.stderr and "Traceback" not in bad.stderr


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize(
    ("room", "forbidden"),
    [
        ("common", {"client", "server", "simulation"}),
        ("client", {"server", "simulation"}),
        ("server", {"client", "simulation"}),
    ],
)
def test_imports_flow_one_way(room: str, forbidden: set[str]) -> None:
    for path in (ROOT / room).rglob("*.py"):
        for name in _imports(path):
            parts = name.split(".")
            assert parts[0] not in {"common", "client", "server", "simulation"}, f"{path}: bare import {name}"
            if parts[0] == "fedpath" and len(parts) > 1:
                assert parts[1] not in forbidden, f"{path} imports {name}"


@pytest.mark.slow
def test_wheel_holds_the_four_rooms_and_the_commands(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("fedpath-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("common/manifest.py", "client/training.py", "server/__init__.py", "simulation/synth.py"):
        assert f"fedpath/{module}" in names
    assert not any(n.startswith(("tests/", "common/", "fedpath/tests")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[fedpath.commands]" in text and "fedpath = fedpath.common.cli:main" in text
    # the installed wheel imports on its own: no site hooks (so no editable finder), dependencies from the venv
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    deps = next(p for p in sys.path if p.endswith("site-packages"))
    probe = "import fedpath.common.manifest as m, fedpath.simulation.synth; print(m.__file__)"
    out = subprocess.run(
        [sys.executable, "-S", "-c", probe],
        env={"PYTHONPATH": f"{target}:{deps}"},
        check=True,
        capture_output=True,
        text=True,
    )
    assert out.stdout.strip().startswith(str(target))


@pytest.mark.slow
def test_demo_prints_a_table_per_site(tmp_path: Path) -> None:
    # baselines only: the federated path of the same runner is tested in test_simulator.py (end to end)
    out = tmp_path / "run"
    args = ["demo", "--out", str(out), "--sites", "3", "--slides", "40", "--dim", "8", "--rounds", "1"]
    result = run_cli(*args, "--methods", "local,pooled")
    assert result.returncode == 0, result.stderr
    # 7–8 training patients per hospital here: the cohort table, printed first, says no local model is
    # trained (too small to train alone), and none is in the table or the results
    assert result.stdout.count("none: too small to train alone (< 10 training patients)") == 3
    table = result.stdout[result.stdout.index("LEAVE-ONE-SITE-OUT") :]
    for site in ("site-A", "site-B", "site-C"):
        assert site in table
    assert "pooled" in table and not any(line.startswith("local") for line in table.splitlines())
    assert f"report: {out / 'report.html'}" in result.stdout
    with (out / "results.csv").open() as f:
        assert len(f.read().splitlines()) == 1 + 3  # header, pooled at 3 sites


@pytest.mark.parametrize("command", ["run", "simulate", "compare", "demo", "mil"])
def test_training_options_take_their_defaults_from_the_one_settings_model(command: str) -> None:
    """Every command that exposes a shared training setting parses, given nothing, to that setting's default in
    `TrainingSettings`, and the run config and the comparison config declare none of them again."""
    from fedpath.common.options import model_values
    from fedpath.common.runconfig import RunConfig
    from fedpath.common.settings import TrainingSettings
    from fedpath.simulation.compare import CompareConfig

    parser = build_parser(discover_commands())
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    defaults = {a.dest: a.default for a in sub._actions}
    exposed = {f: defaults[f] for f in TrainingSettings.model_fields if f in defaults}
    assert {"lr", "local_steps", "model"} <= set(exposed) or command == "mil"
    shared = TrainingSettings()
    for field, default in exposed.items():
        if isinstance(getattr(shared, field), tuple):
            continue
        assert default == getattr(shared, field), f"{command} --{field}: {default!r}"
    assert model_values(argparse.Namespace(**exposed), TrainingSettings) == exposed
    for config in (RunConfig, CompareConfig):
        own = {f for f in config.__annotations__ if f in TrainingSettings.model_fields}
        assert not own, f"{config.__name__} declares {own} again"
