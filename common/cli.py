"""The `fedpath` command.

Each room (common, client, server, simulation) declares its subcommands as `Command` objects under the
entry-point group ``fedpath.commands`` in pyproject.toml. The launcher discovers them there, so this module
imports nothing from the other rooms, and a subcommand's heavy imports (torch, Flower) happen inside its
`run`, never at `--help` time.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points

from fedpath.common.version import fedpath_version


class Terminated(KeyboardInterrupt):
    """SIGTERM (a service manager's or `kill`'s stop): unwinds like Ctrl-C, so every `finally` that stops a
    Flower process runs; exit status 143."""


def _terminate(signum: int, _frame: object) -> None:
    raise Terminated()


class UserError(Exception):
    """An error caused by the user's input: printed as one clear message, exit status 2, no traceback."""


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default only when it says something (not None, False or an empty string)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, "") or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def discover_commands() -> list[Command]:
    commands = []
    for ep in entry_points(group="fedpath.commands"):
        command = ep.load()
        if not isinstance(command, Command):
            raise TypeError(f"entry point {ep.name} = {ep.value} is not a fedpath Command")
        commands.append(command)
    return sorted(commands, key=lambda c: c.name)


def build_parser(commands: Sequence[Command]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedpath",
        description="Federated computational pathology: extract features at each site, train attention-MIL "
        "with FedProx on Flower, simulate federations and report cross-site generalization.",
    )
    parser.add_argument("--version", action="version", version=f"fedpath {fedpath_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in commands:
        p = sub.add_parser(
            command.name,
            help=command.help,
            description=command.description or command.help,
            formatter_class=_HelpFormatter,
        )
        command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(discover_commands())
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args._run(args))
    except UserError as err:
        print(f"fedpath {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        how = "stopped (SIGTERM)" if isinstance(stop, Terminated) else "interrupted"
        print(
            f"fedpath {args.command}: {how}; the processes it started are stopped, finished outputs are kept, "
            "nothing half-written.",
            file=sys.stderr,
        )
        return 143 if isinstance(stop, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
