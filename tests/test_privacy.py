import concurrent.futures
import json
import math
import multiprocessing
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedpath.client import privacy
from fedpath.client.privacy import (
    DEFAULT_BUDGET_EPSILON,
    BudgetExhausted,
    DPConfig,
    LedgerTampered,
    PrivacyError,
    PrivacyLedger,
    PrivatePlan,
    calibrate_noise,
    default_delta,
    epsilon_of,
    format_ledger,
    make_private,
    plan_round,
)
from fedpath.client.training import TrainConfig, train_epochs
from fedpath.common.bags import Bag, BagDataset, bags_from_manifest
from fedpath.common.manifest import load_manifest
from fedpath.common.mil import create_mil
from fedpath.common.runconfig import round_seed
from tests.helpers import write_csv, write_feature_file


def test_accountant_matches_opacus_reference_values() -> None:
    # Opacus's own test configuration (shared/reference/field.md): q=0.04, σ=1.5, 2250 steps, δ=1e-5
    assert epsilon_of([(1.5, 0.04, 2250)], 1e-5) == pytest.approx(7.3291, abs=1e-3)
    # the same steps split over rounds compose to the same ε
    assert epsilon_of([(1.5, 0.04, 750)] * 3, 1e-5) == pytest.approx(7.3291, abs=1e-3)
    # get_noise_multiplier(ε=8, δ=1e-5, q=0.04, 90 epochs) = 1.416 with the RDP accountant
    assert calibrate_noise(8.0, 1e-5, 0.04, 90 * 25) == pytest.approx(1.416, abs=0.01)


@pytest.mark.parametrize(
    ("target", "q", "steps", "prior"),
    [
        (8.0, 0.2, 30, []),
        (1.78, 0.424, 33, []),
        (0.59, 0.441, 111, []),  # σ ≈ 31: five doublings before the bracket
        (6.12, 0.056, 163, []),
        (4.0, 0.1, 20, [(1.3, 0.1, 20), (2.0, 0.12, 15)]),  # a site's later round: its ledger comes first
    ],
)
def test_calibrated_noise_is_the_smallest_within_budget_to_1e4(
    target: float,
    q: float,
    steps: int,
    prior: list[tuple[float, float, int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedpath.common import accounting

    computed = 0
    real = accounting.epsilon_of

    def counted(history: list[tuple[float, float, int]], delta: float) -> float:
        nonlocal computed
        computed += 1
        return real(history, delta)

    monkeypatch.setattr("fedpath.client.privacy.epsilon_of", counted)
    sigma = calibrate_noise(target, 1e-5, q, steps, prior)
    assert real([*prior, (sigma, q, steps)], 1e-5) <= target  # within budget, as computed by Opacus's curves
    assert real([*prior, (sigma - 1e-4, q, steps)], 1e-5) > target  # and 1e-4 less would not be
    assert computed <= 13, computed  # halving the bracket took 16-24 ε computations for these


def _cohort(tmp_path: Path, patients: int, slides_per_patient: int, dim: int = 6) -> Path:
    rows = []
    for p in range(patients):
        for s in range(slides_per_patient):
            name = f"p{p}s{s}"
            write_feature_file(tmp_path / f"{name}.h5", n_tiles=5 + s, dim=dim, seed=p * 10 + s)
            rows.append([name, f"p{p}", "H", str(p % 2), f"{name}.h5"])
    return write_csv(tmp_path / "m.csv", ["slide_id", "patient_id", "site", "label", "features"], rows)


def test_sample_rate_counts_patients_not_slides_or_tiles(tmp_path: Path) -> None:
    m = load_manifest(_cohort(tmp_path, patients=10, slides_per_patient=3))
    bags = bags_from_manifest(m)
    assert len(bags) == 10  # one bag per patient: the privacy unit
    ledger = PrivacyLedger(tmp_path / "ledger.json", site="H", delta=default_delta(len(bags)))
    plan = plan_round(
        DPConfig(noise_multiplier=1.0, expected_batch_size=2), ledger, patients=len(bags), epochs=3
    )
    assert plan.sample_rate == pytest.approx(2 / 10)  # not 2/30 slides, not 2/(tiles)
    assert plan.steps == 3 * 5
    assert plan.delta == pytest.approx(1e-5)  # min(1e-5, 1/(100·n)): far below 1/n = 0.1
    model = create_mil("abmil", in_dim=6, num_classes=2, hidden_dim=8, attention_dim=4)
    stats = train_epochs(model, bags, TrainConfig(epochs=3, seed=0), privacy=plan)
    assert stats.steps == plan.steps  # every planned step taken, empty Poisson batches included
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # Opacus hooks removed

    # with local steps (the default), a round is that many noisy steps, planned, taken and accounted as such
    fixed = plan_round(
        DPConfig(noise_multiplier=1.0, expected_batch_size=2), ledger, patients=10, epochs=3, steps=7
    )
    assert fixed.steps == 7 and fixed.epsilon_after < plan.epsilon_after  # 7 steps spend less than 15
    model = create_mil("abmil", in_dim=6, num_classes=2, hidden_dim=8, attention_dim=4)
    assert train_epochs(model, bags, TrainConfig(steps=7, seed=0), privacy=fixed).steps == 7


def test_ledger_composes_across_rounds_runs_and_restarts(tmp_path: Path) -> None:
    path = tmp_path / "site" / "ledger.json"
    ledger = PrivacyLedger(path, site="H1", delta=1e-4)
    eps = []
    for r in (1, 2, 3):
        eps.append(ledger.record(run="run-1", round=r, noise_multiplier=1.2, q=0.1, steps=20).epsilon)
    assert eps == sorted(eps) and eps[0] < eps[1] < eps[2]
    # a restart (a new process) reads the same spending back
    again = PrivacyLedger(path, site="H1", delta=0.5)  # δ of an existing ledger is kept
    assert again.delta == 1e-4 and again.epsilon == pytest.approx(eps[-1])
    nxt = again.record(run="run-2", round=1, noise_multiplier=1.2, q=0.1, steps=20)
    assert nxt.epsilon > eps[-1]
    assert nxt.epsilon == pytest.approx(epsilon_of([(1.2, 0.1, 20)] * 4, 1e-4))
    with pytest.raises(PrivacyError, match="belongs to site 'H1'"):
        PrivacyLedger(path, site="H2", delta=1e-4)
    path.write_text("{not json")
    with pytest.raises(PrivacyError, match=r"unreadable privacy ledger.*do not delete it"):
        PrivacyLedger(path, site="H1", delta=1e-4)


def test_budget_refuses_the_round_that_would_exceed_it(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "l.json", site="H1", delta=1e-3)
    config = DPConfig(noise_multiplier=1.0, expected_batch_size=10, budget_epsilon=3.0)
    spent = []
    with pytest.raises(
        BudgetExhausted, match=r"site 'H1': privacy budget exhausted.*> budget 3\.000"
    ) as info:
        for r in range(1, 50):
            plan = plan_round(config, ledger, patients=100, epochs=1)
            spent.append(
                ledger.record(
                    run="r",
                    round=r,
                    noise_multiplier=plan.noise_multiplier,
                    q=plan.sample_rate,
                    steps=plan.steps,
                ).epsilon
            )
    assert spent and max(spent) <= 3.0 < info.value.projected
    assert info.value.spent == pytest.approx(spent[-1])


def test_target_epsilon_is_reached_over_the_planned_rounds(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "l.json", site="H", delta=1e-3)
    config = DPConfig(target_epsilon=4.0, expected_batch_size=10)
    for r in range(1, 4):
        plan = plan_round(config, ledger, patients=100, epochs=2, rounds_left=4 - r)
        ledger.record(
            run="r", round=r, noise_multiplier=plan.noise_multiplier, q=plan.sample_rate, steps=plan.steps
        )
    assert ledger.epsilon == pytest.approx(4.0, abs=0.01)
    with pytest.raises(BudgetExhausted):
        plan_round(config, ledger, patients=100, epochs=2)
    with pytest.raises(ValueError, match="exactly one of"):
        DPConfig(noise_multiplier=1.0, target_epsilon=2.0)


@pytest.mark.parametrize("name", ["abmil"])
def test_padding_does_not_leak_between_bags(name: str) -> None:
    """A patient's clipped gradient must not depend on the other bags in its batch or their padding."""
    torch.manual_seed(0)
    model = create_mil(name, in_dim=5, num_classes=2, dropout=0.0)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    bags = [torch.randn(n, 5) for n in (4, 9, 2)]
    labels = torch.tensor([1, 0, 1])

    def per_sample(batch_bags: list[torch.Tensor], batch_labels: torch.Tensor) -> list[torch.Tensor]:
        longest = max(len(b) for b in batch_bags)
        feats = torch.randn(len(batch_bags), longest, 5) * 50  # garbage in the padding
        mask = torch.zeros(len(batch_bags), longest, dtype=torch.bool)
        for i, b in enumerate(batch_bags):
            feats[i, : len(b)] = b
            mask[i, : len(b)] = True
        gsm.zero_grad()
        loss = torch.nn.functional.cross_entropy(gsm(feats, mask).logits, batch_labels, reduction="sum")
        loss.backward()
        grads = [p.grad_sample.clone() for p in model.parameters()]  # type: ignore[attr-defined]
        for p in model.parameters():
            p.grad_sample = None  # type: ignore[attr-defined]
        return grads

    together = per_sample(bags, labels)
    for i, bag in enumerate(bags):
        alone = per_sample([bag], labels[i : i + 1])
        for g_batch, g_alone in zip(together, alone, strict=True):
            torch.testing.assert_close(g_batch[i], g_alone[0], rtol=1e-4, atol=1e-6)


def test_proximal_pull_survives_dp(tmp_path: Path) -> None:
    m = load_manifest(_cohort(tmp_path, patients=12, slides_per_patient=1))
    bags = bags_from_manifest(m)

    def drift(mu: float) -> float:
        torch.manual_seed(1)
        model = create_mil("abmil", in_dim=6, num_classes=2, hidden_dim=8, attention_dim=4)
        start = [p.detach().clone() for p in model.parameters()]
        ledger = PrivacyLedger(tmp_path / f"l{mu}.json", site="H", delta=1e-2)
        plan = plan_round(
            DPConfig(noise_multiplier=1.0, expected_batch_size=4), ledger, patients=12, epochs=4
        )
        train_epochs(model, bags, TrainConfig(epochs=4, lr=1e-2, seed=0, proximal_mu=mu), privacy=plan)
        with torch.no_grad():
            return float(
                sum(((p - s) ** 2).sum() for p, s in zip(model.parameters(), start, strict=True)) ** 0.5
            )

    free, pulled = drift(0.0), drift(20.0)
    assert pulled < 0.5 * free, (free, pulled)


# --- unpredictable noise ------------------------------------------------------------------------------------

SIGMA, CLIP, BATCH = 1.0, 1.0, 4


def _noise_only_step(bags: list[Bag], seed: int) -> tuple[list[torch.Tensor], DPOptimizer]:
    """One DP-SGD step on an empty Poisson batch (no data, only noise) with plain SGD at lr 1; returns the
    update of every parameter (= −noise / expected batch) and the optimizer."""
    torch.manual_seed(0)
    model = create_mil("abmil", in_dim=6, num_classes=2, hidden_dim=8, attention_dim=4)
    before = [p.detach().clone() for p in model.parameters()]
    plan = PrivatePlan(SIGMA, 0.5, 1, 1e-5, 0.0, 0.0, CLIP, BATCH)
    dataset = BagDataset(bags, max_tiles=None, seed=seed)
    trained, optimizer, _ = make_private(
        model, torch.optim.SGD(model.parameters(), lr=1.0), dataset, plan, dim=6, seed=seed
    )
    out = trained(torch.zeros(0, 1, 6), torch.zeros(0, 1, dtype=torch.bool))
    (out.logits.sum() * 0.0).backward()
    optimizer.step()
    trained._close()  # type: ignore[operator]
    return [p.detach() - b for p, b in zip(model.parameters(), before, strict=True)], optimizer


def _residual(update: list[torch.Tensor], generator: torch.Generator | None, secure: bool) -> float:
    """What is left of the update after subtracting the noise the coordinator regenerates from `generator`."""
    from opacus.optimizers.optimizer import _generate_noise

    left = [
        u + _generate_noise(SIGMA * CLIP, u, generator=generator, secure_mode=secure) / BATCH for u in update
    ]
    return float(torch.sqrt(sum((r**2).sum() for r in left)))


def test_coordinator_cannot_regenerate_and_subtract_the_noise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attack of issue 14: the coordinator knows the seed (run seed, round, site) and σ, regenerates the
    noise with the seeding the site used to have and subtracts it. The noise must stay."""
    bags = bags_from_manifest(load_manifest(_cohort(tmp_path, patients=8, slides_per_patient=1)))
    seed = round_seed(7, 3, "H")
    update, optimizer = _noise_only_step(bags, seed)
    params = sum(u.numel() for u in update)
    noise_norm = SIGMA * CLIP * params**0.5 / BATCH  # expected norm of the noise in the update
    norm = float(torch.sqrt(sum((u**2).sum() for u in update)))
    assert 0.8 * noise_norm < norm < 1.2 * noise_norm
    # every seeding the coordinator could know: the old one (seed + 1), the seed itself, torch's global RNG
    # as train_epochs seeds it; each with and without Opacus's secure sampling
    guesses: list[Callable[[], torch.Generator | None]] = [
        lambda: torch.Generator().manual_seed(seed + 1),
        lambda: torch.Generator().manual_seed(seed),
        lambda: torch.manual_seed(seed) and None,
    ]
    for guess in guesses:
        for secure in (True, False):
            assert _residual(update, guess(), secure) > 0.8 * noise_norm  # ≈ √2 · noise: nothing removed
    # the attack itself works: against the old seeding it removes the noise entirely
    monkeypatch.setattr(privacy, "noise_generator", lambda: torch.Generator().manual_seed(seed + 1))
    predictable, _ = _noise_only_step(bags, seed)
    assert _residual(predictable, torch.Generator().manual_seed(seed + 1), optimizer.secure_mode) < 1e-5


def test_same_seed_adds_different_noise(tmp_path: Path) -> None:
    bags = bags_from_manifest(load_manifest(_cohort(tmp_path, patients=10, slides_per_patient=1)))
    plan = PrivatePlan(SIGMA, 0.4, 5, 1e-5, 0.0, 0.0, CLIP, BATCH)

    def weights(privacy_plan: PrivatePlan | None) -> torch.Tensor:
        torch.manual_seed(0)
        model = create_mil("abmil", in_dim=6, num_classes=2, hidden_dim=8, attention_dim=4)
        config = TrainConfig(epochs=2, seed=11, optimizer="sgd", lr=0.05)
        train_epochs(model, bags, config, privacy=privacy_plan)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(weights(None), weights(None))  # without DP the same seed trains the same weights
    first, second = weights(plan), weights(plan)
    assert float((first - second).norm()) > 0.1 * SIGMA * CLIP / BATCH * first.numel() ** 0.5
    first_update, _ = _noise_only_step(bags, 5)
    second_update, _ = _noise_only_step(bags, 5)
    assert all(not torch.equal(a, b) for a, b in zip(first_update, second_update, strict=True))


# --- every round recorded; a ledger you can trust ----------------------------------------------------------


def test_round_without_dp_is_recorded_and_voids_the_guarantee(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "l.json", site="H", delta=1e-5)
    ledger.record(run="a", round=1, noise_multiplier=1.0, q=0.1, steps=10)
    entry = ledger.record(run="b", round=1, noise_multiplier=None, steps=7, policy={"require_dp": False})
    assert not entry.dp and math.isinf(entry.epsilon) and entry.policy == {"require_dp": False}
    again = PrivacyLedger(tmp_path / "l.json", site="H", delta=1e-5)
    assert len(again.entries) == 2 and again.void and math.isinf(again.epsilon)
    with pytest.raises(BudgetExhausted, match="guarantee is void"):
        plan_round(DPConfig(noise_multiplier=5.0, budget_epsilon=100.0), again, patients=50, epochs=1)
    assert "no DP" in format_ledger(again) and "trained without DP" in format_ledger(again)


def test_default_budget_is_finite() -> None:
    assert DPConfig(noise_multiplier=1.0).budget == DEFAULT_BUDGET_EPSILON == 8.0
    assert DPConfig(target_epsilon=3.0).budget == 3.0
    assert default_delta(18) == 1e-5 and default_delta(10**6) == pytest.approx(1e-8)


def _spent(tmp_path: Path) -> Path:
    path = tmp_path / "state" / "H.json"
    ledger = PrivacyLedger(path, site="H", delta=1e-5)
    for r in (1, 2, 3):
        ledger.record(run="r1", round=r, noise_multiplier=1.0, q=0.1, steps=20)
    return path


def test_hash_chain_detects_an_edited_entry(tmp_path: Path) -> None:
    path = _spent(tmp_path)
    data = json.loads(path.read_text())
    data["entries"][1]["noise_multiplier"] = 50.0  # pretend round 2 was nearly free
    path.write_text(json.dumps(data))
    with pytest.raises(LedgerTampered, match=r"entry 2 of 3 .* edited.*restore the ledger"):
        PrivacyLedger(path, site="H", delta=1e-5)
    data = json.loads(_spent(tmp_path / "b").read_text())
    data["delta"] = 0.5  # a larger δ makes every ε smaller
    (tmp_path / "b" / "state" / "H.json").write_text(json.dumps(data))
    with pytest.raises(LedgerTampered, match="entry 1 of 3"):
        PrivacyLedger(tmp_path / "b" / "state" / "H.json", site="H", delta=1e-5)


def test_deleted_or_truncated_ledger_stops_the_site(tmp_path: Path) -> None:
    path = _spent(tmp_path)
    saved = path.read_text()
    data = json.loads(saved)
    data["entries"] = data["entries"][:2]  # the last round removed: the chain alone cannot see it
    path.write_text(json.dumps(data))
    with pytest.raises(LedgerTampered, match=r"holds 2 round\(s\), but its anchor shows 3"):
        PrivacyLedger(path, site="H", delta=1e-5)
    path.unlink()
    with pytest.raises(LedgerTampered, match=r"missing, but its anchor H\.json\.anchor shows it held 3"):
        PrivacyLedger(path, site="H", delta=1e-5)
    path.write_text(saved)  # restored from backup: usable again
    assert len(PrivacyLedger(path, site="H", delta=1e-5).entries) == 3
    (tmp_path / "state" / "H.json.anchor").unlink()
    with pytest.raises(LedgerTampered, match=r"anchor H\.json\.anchor is missing"):
        PrivacyLedger(path, site="H", delta=1e-5)


def test_version_1_ledger_is_chained_on_load(tmp_path: Path) -> None:
    path = tmp_path / "v1.json"
    entry = {"run": "r", "round": 1, "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 20}
    entry["epsilon"], entry["time"] = epsilon_of([(1.0, 0.1, 20)], 1e-4), "2026-01-01T00:00:00+00:00"
    path.write_text(json.dumps({"version": 1, "site": "H", "delta": 1e-4, "entries": [entry]}))
    ledger = PrivacyLedger(path, site="H", delta=1e-5)
    assert ledger.delta == 1e-4 and len(ledger.entries) == 1
    ledger.record(run="r", round=2, noise_multiplier=1.0, q=0.1, steps=20)
    again = PrivacyLedger(path, site="H", delta=1e-5)
    assert json.loads(path.read_text())["version"] == 2 and len(again.entries) == 2


def _record_many(path: str, worker: int, rounds: int, budget: float) -> list[str]:
    """A second (or third…) run at the same site recording its rounds: in its own process, as in deployment."""
    outcomes = []
    for r in range(1, rounds + 1):
        ledger = PrivacyLedger(path, site="H", delta=1e-5)  # read at round start, as the ClientApp does
        try:
            ledger.record(run=f"run-{worker}", round=r, noise_multiplier=1.0, q=0.05, steps=10, budget=budget)
            outcomes.append("ok")
        except BudgetExhausted:
            outcomes.append("refused")
    return outcomes


def test_concurrent_runs_lose_no_entry_and_respect_the_budget(tmp_path: Path) -> None:
    path = tmp_path / "H.json"
    workers, rounds = 3, 4
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(_record_many, str(path), w, rounds, math.inf) for w in range(workers)]
        assert all(f.result() == ["ok"] * rounds for f in futures)
    ledger = PrivacyLedger(path, site="H", delta=1e-5)
    assert len(ledger.entries) == workers * rounds
    assert sorted((e.run, e.round) for e in ledger.entries) == sorted(
        (f"run-{w}", r) for w in range(workers) for r in range(1, rounds + 1)
    )
    expected = epsilon_of([(1.0, 0.05, 10)] * (workers * rounds), 1e-5)
    assert ledger.epsilon == pytest.approx(expected) and ledger.entries[-1].epsilon == pytest.approx(expected)
    # with a budget for 6 rounds in all, threads racing on stale ledgers record exactly 6: the re-check
    # under the lock sees what the others spent
    budget = epsilon_of([(1.0, 0.05, 10)] * 6, 1e-5) + 1e-6
    other = tmp_path / "budget.json"
    with concurrent.futures.ThreadPoolExecutor(workers) as threads:
        results = list(threads.map(lambda w: _record_many(str(other), w, rounds, budget), range(workers)))
    assert sum(o == "ok" for outcome in results for o in outcome) == 6
    assert len(PrivacyLedger(other, site="H", delta=1e-5).entries) == 6


def test_a_ledger_read_while_another_run_writes_waits_for_the_anchor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that opens the site's ledger between another run's ledger write and its anchor write (the very
    first round above all, when no anchor exists yet) reads after both, not a ledger it takes for tampered."""
    import threading

    from fedpath.common import atomic

    path = tmp_path / "H.json"
    ledger_written, reader_done = threading.Event(), threading.Event()
    real = atomic.write_text_atomic

    def slow_anchor(target: Path, text: str) -> None:
        if Path(target).name.endswith(".anchor"):
            ledger_written.set()
            reader_done.wait(1.0)  # the reader gets this long to read the half-written pair
        real(target, text)

    monkeypatch.setattr(privacy, "write_text_atomic", slow_anchor)
    results: list[object] = []

    def read() -> None:
        ledger_written.wait(5)
        try:
            results.append(len(PrivacyLedger(path, site="H", delta=1e-5).entries))
        except PrivacyError as err:
            results.append(err)
        reader_done.set()

    reader = threading.Thread(target=read)
    reader.start()
    PrivacyLedger(path, site="H", delta=1e-5).record(
        run="r", round=1, noise_multiplier=1.0, q=0.05, steps=10, budget=math.inf
    )
    reader.join(5)
    assert results == [1], results


def test_accounting_equals_opacus_and_its_work_per_round_does_not_grow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ε is Opacus's RDPAccountant's to the last digits; and a site's calibration plus ledger ε at round 10
    computes no more RDP curves than at round 1 (each round's σ differs, so nothing merges: before the cache,
    every round recomputed every earlier round at every step of its search, and DP rounds slowed down)."""
    import random

    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp

    from fedpath.common import accounting

    rng = random.Random(0)
    for _ in range(10):
        history = [(rng.uniform(0.5, 3), rng.uniform(0.01, 0.5), rng.randint(1, 50)) for _ in range(4)]
        reference = RDPAccountant()
        reference.history = list(history)
        assert accounting.epsilon_of(history, 1e-5) == pytest.approx(reference.get_epsilon(delta=1e-5), 1e-12)

    calls = 0
    real = rdp.compute_rdp

    def counted(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(rdp, "compute_rdp", counted)
    accounting._rdp_per_step.cache_clear()
    history: list[tuple[float, float, int]] = []
    per_round = []
    for r in range(1, 11):
        calls = 0
        sigma = calibrate_noise(8.0, 1e-5, 0.2 + r / 1000, 3 * (11 - r), history)  # a new q: no cache hits
        history.append((sigma, 0.2 + r / 1000, 3))
        accounting.epsilon_of(history, 1e-5)
        per_round.append(calls)
    assert max(per_round) <= per_round[0] + 2, per_round  # before the cache: 17 at round 1, 179 at round 10
