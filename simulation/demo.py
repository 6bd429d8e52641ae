"""`fedpath demo`: synthesize a multi-site cohort, run a simulated FedProx federation over its sites (Flower's
simulation engine, the same ServerApp and ClientApp as a deployment), train a pooled model on the same training
patients for the same number of epochs, and compare both on every site's held-out test patients."""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fedpath.common.cli import Command, UserError
from fedpath.server.server_cli import add_training_options, run_settings
from fedpath.simulation.synth_cli import add_cohort_options, cohort_config


@dataclass(frozen=True)
class SiteResult:
    site: str
    patients: int
    positives: int
    fedprox_auroc: float
    fedprox_low: float
    fedprox_high: float
    pooled_auroc: float
    pooled_low: float
    pooled_high: float


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="demo folder (cohort, runs, results)")
    add_training_options(p)
    p.set_defaults(rounds=5, local_epochs=2, mu=0.01)
    add_cohort_options(p)


def format_table(rows: list[SiteResult]) -> str:
    head = f"{'site':<8} {'test patients':>13} {'positive':>8}   {'FedProx AUROC [95% CI]':<24} {'pooled AUROC [95% CI]':<24}"
    lines = [head]
    for r in rows:
        fed = f"{r.fedprox_auroc:.3f} [{r.fedprox_low:.3f}, {r.fedprox_high:.3f}]"
        pooled = f"{r.pooled_auroc:.3f} [{r.pooled_low:.3f}, {r.pooled_high:.3f}]"
        lines.append(f"{r.site:<8} {r.patients:>13} {r.positives:>8}   {fed:<24} {pooled:<24}")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    import torch

    from fedpath.client.training import TrainConfig, predict, train_epochs
    from fedpath.common.atomic import write_text_atomic
    from fedpath.common.bags import bags_from_manifest
    from fedpath.common.manifest import load_manifest, split_patients
    from fedpath.common.metrics import aggregate_by_patient, auroc, bootstrap_ci
    from fedpath.common.mil import create_mil
    from fedpath.server.runfolder import RunFolder, load_model
    from fedpath.simulation.simulate import SimulationError, federation_config, simulate
    from fedpath.simulation.synth import SynthConfig, synthesize

    started = time.perf_counter()
    out: Path = args.out.resolve()
    cohort = cohort_config(args)
    assert isinstance(cohort, SynthConfig)
    manifest_path = synthesize(out / "cohort", cohort)
    manifest = load_manifest(manifest_path)
    sites = manifest.sites
    print(
        f"cohort: {len(manifest.slides)} slides, {len(manifest.patients())} patients at {len(sites)} sites ({manifest_path})"
    )

    run_dir = out / "fedprox"
    if RunFolder(run_dir).checkpoint_rounds():
        shutil.rmtree(run_dir)  # the demo's own earlier run: a demo always starts from round 1
        print(f"(replaced the earlier demo run in {run_dir})")
    run = federation_config(manifest_path, run_dir=run_dir, **run_settings(args, len(sites)))
    print(
        f"\n1/2 FedProx (μ={run.proximal_mu}) on Flower's simulation engine: {len(sites)} sites, "
        f"{run.num_server_rounds} rounds × {run.local_epochs} local epochs"
    )
    try:
        fed = simulate(run, sites=len(sites))
    except SimulationError as err:
        raise UserError(str(err)) from err
    fed_model, _ = load_model(RunFolder(run_dir).model)

    splits = split_patients(manifest, val=run.val_fraction, test=run.test_fraction, seed=run.split_seed)
    train_patients = set().union(*(s.train for s in splits.values()))
    epochs = run.num_server_rounds * run.local_epochs
    print(f"\n2/2 pooled baseline: all sites' training patients in one place, {epochs} epochs")
    t_pooled = time.perf_counter()
    torch.manual_seed(run.seed)
    pooled = create_mil(run.model, in_dim=run.in_dim, num_classes=run.num_classes)
    config = TrainConfig(
        epochs=epochs, lr=run.lr, batch_size=run.batch_size, max_tiles=run.max_tiles or None, seed=run.seed
    )
    train_epochs(pooled, bags_from_manifest(manifest.for_patients(train_patients)), config, progress=True)
    pooled_seconds = time.perf_counter() - t_pooled

    rows = []
    for site in sites:
        bags = bags_from_manifest(manifest.for_patients(splits[site].test))
        results = []
        for model in (fed_model, pooled):
            pred = predict(model, bags)
            _, labels, probs = aggregate_by_patient(pred.patient_ids, pred.labels, pred.probs)
            results.append(bootstrap_ci(auroc, labels, probs, seed=run.seed))
        f, p = results
        rows.append(
            SiteResult(
                site, len(labels), int((labels == 1).sum()), f.value, f.low, f.high, p.value, p.low, p.high
            )
        )

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(asdict(rows[0])), lineterminator="\n")
    writer.writeheader()
    writer.writerows(asdict(r) for r in rows)
    write_text_atomic(out / "results.csv", buf.getvalue())
    summary = {
        "cohort": cohort.model_dump(),
        "run_config": run.model_dump(),
        "fedprox_seconds": round(fed.seconds, 1),
        "pooled_seconds": round(pooled_seconds, 1),
    }
    write_text_atomic(out / "run.json", json.dumps(summary, indent=2) + "\n")

    print("\nHeld-out test patients of each site (patient level, bootstrap 95% CI):")
    print(format_table(rows))
    print(
        f"\nFedProx {fed.seconds:.0f} s (Flower start-up included), pooled {pooled_seconds:.0f} s; "
        f"done in {time.perf_counter() - started:.0f} s.\noutputs in {out}/ (cohort/, fedprox/ with model.pt, "
        "model_card.md, rounds.jsonl; results.csv, run.json)"
    )
    return 0


COMMAND = Command(
    name="demo",
    help="synthetic cohort: simulated FedProx federation vs pooled training, per-site held-out AUROC",
    description="Synthesize a multi-site cohort, run a FedProx federation over its sites on Flower's simulation "
    "engine, train a pooled model on the same training patients for the same epochs, and print each site's "
    "held-out test AUROC (bootstrap 95%% CI) for both.",
    add_arguments=_add_arguments,
    run=_run,
)
