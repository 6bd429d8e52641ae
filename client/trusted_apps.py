"""A site runs only the apps its consortium signed: the check between receiving an app and running it.

Flower's SuperNode runs each message in a fresh ``flwr-clientapp`` process, which pulls the run's app bundle
(FAB) from the node, unpacks it into ``$FLWR_HOME/apps`` and imports the ClientApp it names. An app that
anyone submitted to the SuperLink would run here with the node's access to the site's data. `fedpath site
start` therefore puts, first on the node's PATH, a launcher named ``flwr-clientapp`` that runs this module:
Flower's own ``flwr-clientapp``, with its unpacking step (``install_from_fab``) preceded by the signature
check of `fedpath.common.appsign`. A bundle that is unsigned, signed by a key the site does not trust, or
changed after signing is refused **before a single file of it is written or imported**: the node's log gets
one line saying so, and the coordinator an error reply for that message (Flower's "ClientApp raised an
exception", with the fixed refusal text; nothing about the site's data).

The trusted keys are federation.toml's ``app-signers``, given to `fedpath site start --federation`; the
launcher reads them from the file named by ``FEDPATH_TRUSTED_APPS`` (set by `site start`). Without that
variable the launcher refuses every app (fail closed), unless ``FEDPATH_ALLOW_UNSIGNED_APPS=1`` (`site start
--allow-unsigned-apps`, for a test federation on one machine).
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedpath.common.appsign import AppSignatureError, trusted_signers, verify_app

TRUST_ENV = "FEDPATH_TRUSTED_APPS"
UNSIGNED_ENV = "FEDPATH_ALLOW_UNSIGNED_APPS"
LAUNCHER = "flwr-clientapp"


class AppRefused(RuntimeError):
    """An app bundle this site does not run. The message is fixed text plus the bundle's hash."""


def signers_from_environment(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The trusted keys (key id → public key); None when unsigned apps are explicitly allowed.

    Raises AppRefused when trust is not configured, or its file cannot be read (fail closed)."""
    if environ.get(UNSIGNED_ENV) == "1":
        return None
    path = environ.get(TRUST_ENV)
    if not path:
        raise AppRefused(
            "no trusted app-signing keys are configured at this site (start it with --federation)"
        )
    from fedpath.common.consortium import ConsortiumFileError, load_federation

    try:
        signers = trusted_signers(load_federation(path).app_signers)
    except (ConsortiumFileError, AppSignatureError) as err:
        raise AppRefused(f"the site's trusted app-signing keys could not be read: {err}") from err
    if not signers:
        raise AppRefused(f"{path} lists no app-signers: ask the consortium for its federation.toml")
    return signers


def check_app(content: bytes, signers: Mapping[str, str] | None, say: Callable[[str], None]) -> None:
    """Refuse (AppRefused) a bundle not signed by one of `signers`; log the outcome either way."""
    digest = hashlib.sha256(content).hexdigest()[:16]
    if signers is None:
        say(f"fedpath: running app {digest} WITHOUT a signature check (--allow-unsigned-apps)")
        return
    try:
        kid = verify_app(content, signers)
    except AppSignatureError as err:
        say(
            f"fedpath: REFUSED app {digest}: {err}. Only apps signed with a key in federation.toml's "
            "app-signers run at this site; nothing of this app was unpacked or run."
        )
        raise AppRefused(f"app {digest} refused by the site: not signed by the consortium") from None
    say(f"fedpath: app {digest} signed by {kid}: running it")


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main() -> None:
    """Flower's ``flwr-clientapp`` with the signature check before the app is unpacked."""
    import flwr.supernode.runtime.run_clientapp as runtime
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    try:
        signers = signers_from_environment(os.environ)
        refusal: AppRefused | None = None
    except AppRefused as err:
        signers, refusal = {}, err
    unpack = runtime.install_from_fab

    def install_if_signed(content: bytes, *args: Any, **kwargs: Any) -> Any:
        if refusal is not None:
            _log(f"fedpath: REFUSED app {hashlib.sha256(content).hexdigest()[:16]}: {refusal}")
            raise refusal
        check_app(content, signers, _log)
        return unpack(content, *args, **kwargs)

    runtime.install_from_fab = install_if_signed  # type: ignore[assignment]
    sys.argv[0] = LAUNCHER  # Flower names its exit events after the command
    flwr_clientapp()


def install_launcher(bin_dir: Path) -> Path:
    """Write the ``flwr-clientapp`` launcher into `bin_dir` (to go first on the node's PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    launcher = bin_dir / LAUNCHER
    python = sys.executable.replace("'", "'\\''")
    launcher.write_text(
        "#!/bin/sh\n"
        "# fedpath: Flower's flwr-clientapp behind the site's app-signature check (fedpath.client.trusted_apps)\n"
        f"exec '{python}' -m fedpath.client.trusted_apps \"$@\"\n",
        encoding="utf-8",
    )
    launcher.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    return launcher


if __name__ == "__main__":
    main()
