"""The coordinator's Flower ServerApp: read the run config, run or resume the FedProx federation.

All settings come from the run config (``[tool.flwr.app.config]``, see `fedpath.common.runconfig`); outputs
go to the absolute ``run-dir``: checkpoints, round log, final model and model card.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpath.common.runconfig import RunConfig
from fedpath.server.federation import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, RunConfig.from_flower(context.run_config))
