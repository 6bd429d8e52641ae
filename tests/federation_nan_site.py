"""A ClientApp for tests: fedpath's own, except that site-B answers every training round with NaN weights.

Shipped into a test's app folder as a module (the FAB puts the app folder on the ClientApp's sys.path), so the
misbehaving site is a real Flower node sending a real message, not a mock.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedpath.client import app as fedpath_app
from fedpath.common.runconfig import SITE_NAME, SITE_RECORD

POISONED_SITE = "site-B"

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = fedpath_app.train(msg, context)
    if reply.content.config_records[SITE_RECORD][SITE_NAME] == POISONED_SITE:
        state = reply.content.array_records["arrays"].to_torch_state_dict()
        first = next(iter(state))
        state[first] = torch.full_like(state[first], float("nan"))
        reply.content["arrays"] = ArrayRecord(state)
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return fedpath_app.evaluate(msg, context)
