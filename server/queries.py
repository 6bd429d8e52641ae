"""One query to every connected site, as the coordinator asks for aggregates outside the training rounds
(feature moments before round 1, calibration aggregates after the last)."""

from __future__ import annotations

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedpath.common.runconfig import SITE_NAME, SITE_RECORD, RunConfig


def ask_every_site(
    grid: Grid, run: RunConfig, content: RecordDict, message_type: str
) -> tuple[list[tuple[str, Message]], dict[str, str]]:
    """Send `content` to every connected site, waiting for min-sites nodes as a round does (Flower's own
    `sample_nodes`). Returns the replies without error by site name, and, for the others, site → "error code
    N": the code only, never the text a site sent."""
    _, nodes = sample_nodes(grid, run.min_sites, 0)
    messages = [
        Message(content=content, dst_node_id=node, message_type=message_type) for node in sorted(nodes)
    ]
    answered: list[tuple[str, Message]] = []
    failed: dict[str, str] = {}
    for reply in grid.send_and_receive(messages, timeout=run.round_timeout):
        name = f"node-{reply.metadata.src_node_id}"
        if reply.has_error():
            failed[name] = f"error code {reply.error.code}"
            continue
        record = reply.content.config_records.get(SITE_RECORD)
        if record is not None and isinstance(record.get(SITE_NAME), str) and record.get(SITE_NAME):
            name = str(record[SITE_NAME])
        answered.append((name, reply))
    return answered, failed
