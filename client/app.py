"""The site's Flower ClientApp: load the global weights, train or evaluate on this site's patients, reply.

Train reply: the updated weights (ArrayRecord ``arrays``) and aggregate metrics (``patients``, ``slides``,
``loss``, ``seconds``). Evaluate reply: ``patients``, ``auroc``, ``balanced_accuracy``, ``loss`` on the
site's validation patients. Both carry a ConfigRecord ``site`` with the site's name. Nothing per slide or
per patient (no ids, no scores) leaves the site.

Local training is `fedpath.client.training.train_epochs` with the FedProx term μ/2·‖w − w_global‖², μ taken
from the message (``proximal-mu``, set by the coordinator's FedProx strategy).
"""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fedpath.client.site import SiteData, check_compatible, load_site, resolve_site
from fedpath.client.training import TrainConfig, predict, summarize, train_epochs
from fedpath.common.mil import create_mil
from fedpath.common.runconfig import SITE_NAME, SITE_RECORD, WEIGHT_KEY, RunConfig, round_seed
from fedpath.common.wire import load_arrays, model_to_arrays

app = ClientApp()


def _site_and_model(msg: Message, context: Context) -> tuple[RunConfig, SiteData, nn.Module]:
    run = RunConfig.from_flower(context.run_config)
    run.require_model_shape()
    site = load_site(resolve_site(context.node_config, run), run)
    check_compatible(site, run)
    model = create_mil(run.model, in_dim=run.in_dim, num_classes=run.num_classes)
    load_arrays(model, msg.content.array_records["arrays"])
    return run, site, model


def local_train_config(run: RunConfig, site: str, server_round: int, proximal_mu: float) -> TrainConfig:
    """This site's training settings for one round (seeded by run seed, round and site)."""
    return TrainConfig(
        epochs=run.local_epochs,
        lr=run.lr,
        weight_decay=run.weight_decay,
        batch_size=run.batch_size,
        max_tiles=run.max_tiles or None,
        seed=round_seed(run.seed, server_round, site),
        proximal_mu=proximal_mu,
    )


def _reply(msg: Message, site: SiteData, metrics: MetricRecord, arrays: ArrayRecord | None) -> Message:
    content = RecordDict({"metrics": metrics, SITE_RECORD: ConfigRecord({SITE_NAME: site.name})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    run, site, model = _site_and_model(msg, context)
    config = msg.content.config_records["config"]
    server_round = int(config["server-round"])  # type: ignore[arg-type]
    mu = float(config.get("proximal-mu", 0.0))  # type: ignore[arg-type]
    stats = train_epochs(model, site.train, local_train_config(run, site.name, server_round, mu))
    metrics = MetricRecord(
        {
            WEIGHT_KEY: len(site.train),
            "slides": site.slides_train,
            "loss": stats.loss,
            "seconds": time.perf_counter() - started,
        }
    )
    return _reply(msg, site, metrics, model_to_arrays(model))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    _, site, model = _site_and_model(msg, context)
    if site.val:
        summary = summarize(predict(model, site.val))
    else:
        summary = {"auroc": float("nan"), "balanced_accuracy": float("nan"), "loss": float("nan")}
    metrics = MetricRecord(
        {
            WEIGHT_KEY: len(site.val),
            "auroc": summary["auroc"],
            "balanced_accuracy": summary["balanced_accuracy"],
            "loss": summary["loss"],
            "seconds": time.perf_counter() - started,
        }
    )
    return _reply(msg, site, metrics, None)
