from pathlib import Path

import pytest
import torch
from opacus.grad_sample import GradSampleModule

from fedpath.client.privacy import (
    BudgetExhausted,
    DPConfig,
    PrivacyError,
    PrivacyLedger,
    calibrate_noise,
    default_delta,
    epsilon_of,
    plan_round,
)
from fedpath.client.training import TrainConfig, train_epochs
from fedpath.common.bags import bags_from_manifest
from fedpath.common.manifest import load_manifest
from fedpath.common.mil import create_mil
from tests.helpers import write_csv, write_feature_file


def test_accountant_matches_opacus_reference_values() -> None:
    # Opacus's own test configuration (shared/reference/field.md): q=0.04, σ=1.5, 2250 steps, δ=1e-5
    assert epsilon_of([(1.5, 0.04, 2250)], 1e-5) == pytest.approx(7.3291, abs=1e-3)
    # the same steps split over rounds compose to the same ε
    assert epsilon_of([(1.5, 0.04, 750)] * 3, 1e-5) == pytest.approx(7.3291, abs=1e-3)
    # get_noise_multiplier(ε=8, δ=1e-5, q=0.04, 90 epochs) = 1.416 with the RDP accountant
    assert calibrate_noise(8.0, 1e-5, 0.04, 90 * 25) == pytest.approx(1.416, abs=0.01)


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
    assert plan.delta == pytest.approx(1 / 100)
    model = create_mil("abmil", in_dim=6, num_classes=2, hidden_dim=8, attention_dim=4)
    stats = train_epochs(model, bags, TrainConfig(epochs=3, seed=0), privacy=plan)
    assert stats.steps == plan.steps  # every planned step taken, empty Poisson batches included
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # Opacus hooks removed


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
