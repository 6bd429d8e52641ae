"""The site's Flower ClientApp: load the global weights, train or evaluate on this site's patients, reply.

Train reply: the updated weights (ArrayRecord ``arrays``) and aggregate metrics (``patients``, ``slides``,
``loss``, ``seconds``). Evaluate reply: ``patients``, ``auroc``, ``balanced_accuracy``, ``loss`` on the
site's validation patients. Both carry a ConfigRecord ``site`` with the site's name. Nothing per slide or
per patient (no ids, no scores) leaves the site.

Local training is `fedpath.client.training.train_epochs` with the FedProx term μ/2·‖w − w_global‖², μ taken
from the message (``proximal-mu``, set by the coordinator's FedProx strategy).

With per-patient DP on (run config ``dp-noise`` or ``dp-epsilon``), training is DP-SGD over the site's
patients and every round is entered in the site's privacy ledger, a file that stays at the site; the reply
adds ``epsilon`` (cumulative over all rounds and runs in the ledger), ``delta``, ``dp-noise``,
``dp-sample-rate`` and ``dp-steps``. A round that would take the site past its budget is refused before any
training with an error reply (code ``PRIVACY_EXHAUSTED``), and the coordinator goes on without the site.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fedpath.client.privacy import (
    BudgetExhausted,
    DPConfig,
    PrivacyLedger,
    PrivatePlan,
    default_delta,
    default_ledger_path,
    plan_round,
)
from fedpath.client.site import SiteData, check_compatible, load_site, resolve_site
from fedpath.client.training import TrainConfig, predict, summarize, train_epochs
from fedpath.common.mil import create_mil
from fedpath.common.runconfig import (
    PRIVACY_EXHAUSTED,
    SITE_NAME,
    SITE_RECORD,
    UNIT_WEIGHT_KEY,
    WEIGHT_KEY,
    RunConfig,
    round_seed,
)
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
    # Under DP, SGD with momentum: Adam divides by the running gradient scale, which DP noise dominates.
    return TrainConfig(
        epochs=run.local_epochs,
        lr=run.dp_lr if run.private else run.lr,
        optimizer="sgd" if run.private else "adamw",
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


def privacy_ledger(run: RunConfig, site: SiteData, node_config: Mapping[str, object]) -> PrivacyLedger:
    """The site's ledger: node config 'privacy-ledger', else beside the site's manifest (deployment), else in
    the run folder (simulation, where one machine plays every site)."""
    if "privacy-ledger" in node_config:
        path = Path(str(node_config["privacy-ledger"]))
    elif "manifest" in node_config:
        path = default_ledger_path(str(node_config["manifest"]), site.name)
    else:
        path = Path(run.run_dir) / "privacy" / f"{site.name}.json"
    return PrivacyLedger(path, site=site.name, delta=run.dp_delta or default_delta(len(site.train)))


def privacy_config(run: RunConfig, node_config: Mapping[str, object]) -> DPConfig:
    """DP-SGD settings from the run config; the site's own node config 'privacy-budget' takes precedence."""
    budget = float(node_config.get("privacy-budget", run.dp_budget) or 0.0)  # type: ignore[arg-type]
    return DPConfig(
        noise_multiplier=run.dp_noise or None,
        target_epsilon=run.dp_epsilon or None,
        max_grad_norm=run.dp_clip,
        expected_batch_size=run.dp_batch or run.batch_size,
        budget_epsilon=budget or None,
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    run, site, model = _site_and_model(msg, context)
    config = msg.content.config_records["config"]
    server_round = int(config["server-round"])  # type: ignore[arg-type]
    mu = float(config.get("proximal-mu", 0.0))  # type: ignore[arg-type]
    plan: PrivatePlan | None = None
    if run.private:
        ledger = privacy_ledger(run, site, context.node_config)
        try:
            plan = plan_round(
                privacy_config(run, context.node_config),
                ledger,
                patients=len(site.train),
                epochs=run.local_epochs,
                rounds_left=max(1, run.num_server_rounds - server_round + 1),
            )
        except BudgetExhausted as err:
            return Message(error=Error(code=PRIVACY_EXHAUSTED, reason=str(err)), reply_to=msg)
    train_config = local_train_config(run, site.name, server_round, mu)
    stats = train_epochs(model, site.train, train_config, privacy=plan)
    metrics: dict[str, int | float] = {
        WEIGHT_KEY: len(site.train),
        UNIT_WEIGHT_KEY: 1,
        "slides": site.slides_train,
        "loss": stats.loss,
        "seconds": time.perf_counter() - started,
    }
    if plan is not None:
        entry = ledger.record(
            run=str(context.run_id),
            round=server_round,
            noise_multiplier=plan.noise_multiplier,
            q=plan.sample_rate,
            steps=stats.steps,
        )
        metrics |= {
            "epsilon": entry.epsilon,
            "delta": plan.delta,
            "dp-noise": plan.noise_multiplier,
            "dp-sample-rate": plan.sample_rate,
            "dp-steps": stats.steps,
        }
    return _reply(msg, site, MetricRecord(metrics), model_to_arrays(model))  # type: ignore[arg-type]


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
            UNIT_WEIGHT_KEY: 1,
            "auroc": summary["auroc"],
            "balanced_accuracy": summary["balanced_accuracy"],
            "loss": summary["loss"],
            "seconds": time.perf_counter() - started,
        }
    )
    return _reply(msg, site, metrics, None)
