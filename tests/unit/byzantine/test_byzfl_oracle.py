"""Our update-matrix attacks against ByzFL (EPFL's Byzantine-FL library, PyPI `byzfl`), an
independent implementation, on the same inputs. ByzFL is a test-only dependency (the `test` extra).

Mappings (read from byzfl 0.0.11's byzfl/attacks/attacks.py and byzfl/aggregators/aggregators.py):
- ALIE: ByzFL's `ALittleIsEnough(tau)` is mean + tau * std with ddof 1; ours is mean - z * std with
  ddof 1, so tau = -z. ByzFL takes tau as given (no z_max formula); ours defaults to the paper's z_max.
- IPM: ByzFL's `InnerProductManipulation(tau)` is -tau * mean: tau = our epsilon.
- ByzFL has no Min-Max, Min-Sum, Trim or Krum attack. Its aggregators judge ours instead:
  `Krum(f')` sums the n - f' - 1 nearest squared distances (it sorts each row, self included at 0,
  and keeps columns 1 .. n - f' - 1), while Blanchard et al. and Fang et al. use n - f - 2, so
  ByzFL's Krum(f' = c + 1) is the Krum that Fang's attack with c attackers targets.
  `TrMean(f)` drops f values per tail; `Median` is the coordinate-wise median.
"""

from __future__ import annotations

import pytest
import torch

byzfl = pytest.importorskip("byzfl", reason="ByzFL (pip install byzfl, the test extra) is not installed")

from byzantine.alie import alie  # noqa: E402
from byzantine.fang import direction, krum_attack, trim_attack  # noqa: E402
from byzantine.ipm import ipm  # noqa: E402
from byzantine.minmax import min_max  # noqa: E402


def cloud(k: int = 7, d: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, d, generator=g) + 0.3 * torch.randn(d, generator=g)


@pytest.mark.parametrize("z", [0.0, 0.5244, 1.0, 2.5])
def test_alie_matches_byzfl_with_tau_minus_z(z: float) -> None:
    benign = cloud()
    theirs = byzfl.ALittleIsEnough(tau=-z)(benign)
    assert torch.allclose(alie(benign, torch.zeros(3, 40), z=z), theirs.expand(3, -1), atol=1e-5)


@pytest.mark.parametrize("eps", [0.1, 0.5, 2.0, 100.0])
def test_ipm_matches_byzfl_with_tau_epsilon(eps: float) -> None:
    benign = cloud(seed=1)
    theirs = byzfl.InnerProductManipulation(tau=eps)(benign)
    assert torch.allclose(ipm(benign, torch.zeros(2, 40), epsilon=eps), theirs.expand(2, -1), rtol=1e-5, atol=1e-5)


def test_byzfl_krum_selects_our_krum_attack() -> None:
    g = torch.Generator().manual_seed(0)
    benign, own = torch.randn(8, 6, generator=g) + 0.2, torch.randn(2, 6, generator=g) + 0.2
    crafted = krum_attack(benign, own)
    chosen = byzfl.Krum(f=2 + 1)(torch.cat([benign, crafted]))  # ByzFL's f' = c + 1 (see the docstring)
    assert torch.allclose(chosen, crafted[0])


@pytest.mark.parametrize("rule", ["trmean", "median"])
def test_trim_attack_pushes_byzfl_trimmed_mean_and_median_against_the_direction(rule: str) -> None:
    benign, own = cloud(k=8, seed=2), cloud(k=2, seed=3)
    crafted = trim_attack(benign, own, gen=torch.Generator().manual_seed(0))
    agg = byzfl.TrMean(f=2) if rule == "trmean" else byzfl.Median()
    shift = agg(torch.cat([benign, crafted])) - agg(torch.cat([benign, own]))  # attacked - no attack
    s = direction(benign, own)
    assert bool((shift * s <= 1e-6).all())  # never along the direction the model would move
    assert float((shift * s).sum()) < 0


def test_min_max_stays_within_the_benign_spread_as_byzfl_measures_it() -> None:
    """ByzFL's own distance tool as the ruler of the Min-Max constraint."""
    from byzfl.utils.misc import distance_tool

    benign = cloud(seed=4)
    crafted = min_max(benign, torch.zeros(1, 40))
    tool = distance_tool(benign)
    bound = float(tool.cdist(benign, benign).max())
    assert float(tool.cdist(crafted, benign).max()) <= bound * (1 + 1e-5)
    assert float(tool.cdist(crafted, benign).max()) >= bound * (1 - 1e-3)  # the constraint is tight
