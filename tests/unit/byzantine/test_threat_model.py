"""The threat model of the update-matrix attacks: who knows what, where each runs, and the refusals."""

from __future__ import annotations

import logging

import pytest
import torch

from byzantine.collusion import Colluder, build_colluder
from byzantine.ipm import ipm
from lab.config import load_experiment
from lab.errors import ConfigError

ROOT = __import__("pathlib").Path(__file__).resolve().parents[3]


def cfg(**attack: object):  # type: ignore[no-untyped-def]
    return load_experiment({"federated": {"num_clients": 10},
                            "attack": {"attackers_ratio": 0.3, **attack}})


def problems(**attack: object) -> str:
    with pytest.raises(ConfigError) as err:
        cfg(**attack)
    return str(err.value)


@pytest.mark.parametrize(("kind", "want"), [
    ("alie", "full"), ("ipm", "full"), ("min-max", "full"), ("min-sum", "full"), ("trim-attack", "full"),
    ("krum-attack", "full"), ("backdoor", "partial"), ("scaling", "partial"), ("label-flip", "partial"),
    ("gaussian-noise", "partial"), ("sign-flip", "partial"),
])
def test_default_knowledge_per_attack(kind: str, want: str) -> None:
    assert cfg(type=kind).attack.resolved_knowledge == want
    assert load_experiment({}).attack.resolved_knowledge is None  # no attack


def test_impossible_threat_models_are_refused_before_the_run() -> None:
    assert "attack.knowledge: 'full' is for the update-matrix attacks" in problems(type="label-flip", knowledge="full")
    assert "attack.knowledge: partial alie needs the spread" in problems(type="alie", knowledge="partial")
    assert cfg(type="ipm", knowledge="partial").attack.resolved_knowledge == "partial"
    assert "attack.boost: alie crafts the whole update" in problems(type="alie", boost=5.0)
    assert "attack.boost: scaling already multiplies" in problems(type="scaling", boost=5.0)
    assert "attack.ipm_epsilon: must be > 0" in problems(type="ipm", ipm_epsilon=0.0)
    assert "attack.minmax_gamma_init: must be > 0" in problems(type="min-max", minmax_gamma_init=0.0)
    assert "attack.minmax_gamma_init: must be > 0" in problems(type="min-sum", minmax_gamma_init=-1.0)
    # 6 of 10 attackers: no finite z_max; Krum needs n > 2c + 2
    assert "alie's z_max needs the attackers to be at most half" in problems(type="alie", attackers_ratio=0.6)
    assert cfg(type="alie", attackers_ratio=0.6, alie_z=1.0).attack.alie_z == 1.0
    assert "krum-attack needs n > 2c + 2" in problems(type="krum-attack", attackers_ratio=0.4)


def test_deploy_run_refuses_full_knowledge() -> None:
    from commands.deploy import Deployment, check_fits

    dep = Deployment(folder="x", address="127.0.0.1:1", tls=True, auth=True, isolation="process", num_nodes=10,
                     malicious=[9], ca_cert=None)
    with pytest.raises(ConfigError, match="attack.knowledge: full .* simulation only"):
        check_fits(cfg(type="alie"), dep)
    check_fits(cfg(type="ipm", knowledge="partial"), dep)  # the client-side variant deploys
    check_fits(cfg(type="backdoor"), dep)


def test_colluder_replaces_only_the_acting_malicious_rows(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def attack(benign: torch.Tensor, own: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        seen.append((benign.clone(), own.clone()))
        return ipm(benign, own, epsilon=1.0)

    updates = torch.tensor([[1.0, 0.0], [2.0, 2.0], [3.0, 4.0], [9.0, 9.0]])  # rows from partitions 5, 1, 7, 2
    colluder = Colluder(attack, frozenset({1, 2, 3}), active=lambda p, r: p != 2, seed=0, name="ipm")
    out = colluder(updates.clone(), (5, 1, 7, 2), server_round=1)
    benign, own = seen[0]
    assert torch.equal(benign, updates[[0, 2, 3]])  # partition 2 does not act this round: an honest row
    assert torch.equal(own, updates[[1]])
    assert torch.equal(out[[0, 2, 3]], updates[[0, 2, 3]])
    assert torch.equal(out[1], -updates[[0, 2, 3]].mean(0))
    assert torch.equal(colluder(updates[:2].clone(), (5, 7), 1), updates[:2])  # no attacker in the round
    with pytest.raises(ValueError, match="rows"):
        colluder(updates.clone(), (5, 7), 1)
    with caplog.at_level(logging.WARNING):
        assert torch.equal(colluder(updates[:2].clone(), (1, 3), 1), updates[:2])  # nothing benign to know
    assert "every row is malicious" in caplog.text


def test_build_colluder_only_for_full_knowledge() -> None:
    assert build_colluder(cfg(type="alie"), frozenset({0})) is not None
    assert build_colluder(cfg(type="ipm", knowledge="partial"), frozenset({0})) is None
    assert build_colluder(cfg(type="backdoor"), frozenset({0})) is None
    assert build_colluder(load_experiment({}), frozenset()) is None
