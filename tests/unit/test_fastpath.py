"""lab.kernels / lab.fastpath: the measured CPU path is the plain path's numbers, faster.

Oracles: the plain model forward and a plain SGD loop; the probe is checked on fake trials whose
speed and numbers the test sets, so "the fastest candidate that changes results loses" is exact.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import lab.task
from inversion.optimizer import worth_vectorizing
from lab import fastpath
from lab.data import Split
from lab.fastpath import (
    TOLERANCE,
    Chooser,
    measure,
    mismatch,
    training_plan,
    training_trial,
)
from lab.kernels import (
    DEFAULT,
    Plan,
    candidates,
    chain,
    pool_first_forward,
    prepared,
    running,
)
from lab.models import build_model
from lab.task import LocalHyperparams, generator, set_threads, train_local, usable_cores

SHAPE = (1, 28, 28)
FAST = Plan(channels_last=True, onednn=True, pool_first=True)


def model_of(name: str, seed: int = 0) -> torch.nn.Sequential:
    return build_model(name, SHAPE, 10, (0.5,), (0.25,), seed=seed)


def batch(n: int = 32, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, *SHAPE, generator=gen), torch.randint(0, 10, (n,), generator=gen)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fastpath.ENV_CACHE, str(tmp_path / "kernels"))
    torch.set_num_threads(1)


# -- the exact rewrite: max-pool before ReLU ---------------------------------------------------------

@pytest.mark.parametrize("name", ["fltrust-cnn", "cnn"])
def test_pool_first_is_bit_for_bit_the_models_forward_and_backward(name: str) -> None:
    model = model_of(name)
    keys = list(model.state_dict())
    x, y = batch()
    x = x * 2 - 0.5  # negative pixels too, so whole pooling windows sit below zero
    leaves = chain(model)
    assert leaves is not None
    out_plain = model(x)
    (g_plain,) = torch.autograd.grad(F.cross_entropy(out_plain, y), [model[1][0].weight])
    out_fast = pool_first_forward(leaves)(x)
    (g_fast,) = torch.autograd.grad(F.cross_entropy(out_fast, y), [model[1][0].weight])
    assert torch.equal(out_plain, out_fast) and torch.equal(g_plain, g_fast)
    assert list(model.state_dict()) == keys  # the model itself is not rewritten


def test_pool_first_only_where_relu_precedes_pool() -> None:
    assert any(p.pool_first for p in candidates(model_of("fltrust-cnn")))
    assert not any(p.pool_first for p in candidates(model_of("lenet")))  # lenet pools first already
    assert candidates(model_of("softmax")) == [DEFAULT, Plan(onednn=False)]  # no conv: oneDNN on/off only


# -- a training step both ways -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["fltrust-cnn", "lenet", "cnn"])
def test_fast_training_steps_match_the_plain_ones(name: str) -> None:
    """Five SGD steps under the fastest plan vs the plain path: same weights within TOLERANCE
    (relative L2 per tensor); lenet's dropout draws the same masks in both layouts."""
    x, y = batch()
    runs = []
    for plan in (DEFAULT, FAST):
        model = model_of(name).train()
        torch.manual_seed(3)
        with prepared(model, plan) as forward:
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
            for _ in range(5):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(forward(x), y).backward()
                opt.step()
        runs.append(list(model.state_dict().values()))
    assert mismatch(runs[1], runs[0]) < TOLERANCE


def test_train_local_on_the_fast_path_matches_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = batch(96)
    data = Split(x, y)
    hp = LocalHyperparams(epochs=1, steps=6, batch_size=32, lr=0.05, momentum=0.9, weight_decay=5e-4)
    states, losses = [], []
    for plan in (DEFAULT, FAST):
        monkeypatch.setattr(lab.task, "training_plan", lambda *a, plan=plan, **k: plan)
        model = model_of("fltrust-cnn")
        stats = train_local(model, data, hp, generator(0, "fast"))
        states.append(model.state_dict())
        losses.append(stats.loss)
    assert list(states[0]) == list(states[1])
    assert all(v.is_contiguous() for v in states[1].values())  # safetensors-ready again
    assert mismatch(list(states[1].values()), list(states[0].values())) < TOLERANCE
    assert losses[1] == pytest.approx(losses[0], rel=TOLERANCE)


def test_train_local_restores_flags_and_draws_no_extra_randomness(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe runs on a copy under a forked RNG: lenet's dropout leaves the global stream where
    the plain path leaves it; oneDNN and the thread count are as before."""
    x, y = batch(64)
    hp = LocalHyperparams(epochs=1, steps=2, batch_size=32, lr=0.05, momentum=0.9, weight_decay=0.0)
    flags = (torch.backends.mkldnn.enabled, torch.get_num_threads())
    monkeypatch.setattr(fastpath, "PROCESS_CHOOSER", Chooser(lambda: None))
    states = []
    for mode in ("default", "probe"):
        monkeypatch.setenv(fastpath.ENV_MODE, mode)
        torch.manual_seed(5)
        train_local(model_of("lenet"), Split(x, y), hp, generator(0))
        states.append(torch.random.get_rng_state())
    assert fastpath.PROCESS_CHOOSER.probes_run == 1
    assert torch.equal(states[0], states[1])
    assert (torch.backends.mkldnn.enabled, torch.get_num_threads()) == flags
    with running(Plan(onednn=False, threads=1)):
        assert not torch.backends.mkldnn.enabled
    assert torch.backends.mkldnn.enabled == flags[0]


def test_set_threads_never_exceeds_usable_cores() -> None:
    set_threads(usable_cores() + 7)
    assert torch.get_num_threads() == usable_cores()
    set_threads(1)
    assert torch.get_num_threads() == 1


def test_default_mode_and_other_devices_skip_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = batch()
    chooser = Chooser(lambda: None)
    monkeypatch.setenv(fastpath.ENV_MODE, "default")
    assert training_plan(model_of("cnn"), x, y, lr=0.1, momentum=0.0, weight_decay=0.0, chooser=chooser) == DEFAULT
    assert chooser.probes_run == 0


# -- the probe on fake trials --------------------------------------------------------------------------

def fake_trial(seconds: dict[Plan, float], scale: dict[Plan, float], broken: Sequence[Plan] = ()) -> fastpath.Trial:
    """Each plan's step sleeps `seconds[plan]` and returns [1, 2, 3] * scale[plan]; broken ones raise."""

    def setup(plan: Plan) -> fastpath.Step:
        if plan in broken:
            raise RuntimeError("no kernel for this layout")

        def step() -> list[Tensor]:
            time.sleep(seconds[plan])
            return [torch.tensor([1.0, 2.0, 3.0]) * scale[plan]]

        return step

    return setup


def test_probe_rejects_faster_candidates_that_change_results() -> None:
    plain, cl, wrong, broken = DEFAULT, Plan(channels_last=True), Plan(onednn=False), Plan(pool_first=True)
    seconds = {plain: 0.004, cl: 0.002, wrong: 0.0005, broken: 0.0}
    scale = {plain: 1.0, cl: 1.0 + TOLERANCE / 10, wrong: 1.0 + 10 * TOLERANCE, broken: 1.0}
    probe = measure([plain, cl, wrong, broken], fake_trial(seconds, scale, [broken]), budget_s=0.05)
    assert probe.plan == cl  # the fastest equivalent one, not the fastest
    assert set(probe.seconds) == {plain.label, cl.label}
    assert "relative error" in probe.rejected[wrong.label]
    assert "RuntimeError" in probe.rejected[broken.label]
    assert probe.speedup() > 1.3


def test_probe_with_no_equivalent_alternative_times_nothing() -> None:
    plain, wrong = DEFAULT, Plan(channels_last=True)
    probe = measure([plain, wrong], fake_trial({plain: 0.0, wrong: 0.0}, {plain: 1.0, wrong: 2.0}))
    assert probe.plan == DEFAULT and probe.seconds == {} and list(probe.rejected) == [wrong.label]


def test_probe_keeps_the_default_within_the_margin() -> None:
    plain, cl = DEFAULT, Plan(channels_last=True)
    probe = measure([plain, cl], fake_trial({plain: 0.002, cl: 0.00199}, {plain: 1.0, cl: 1.0}), budget_s=0.05)
    assert probe.plan == DEFAULT and probe.speedup() == 1.0


def test_real_probe_picks_an_equivalent_candidate() -> None:
    model = model_of("fltrust-cnn")
    x, y = batch()
    plans = candidates(model)
    probe = measure(plans, training_trial(model, x, y, lr=0.05, momentum=0.9, weight_decay=5e-4))
    assert probe.plan in plans and probe.plan.label in probe.seconds and probe.plan.label not in probe.rejected
    assert probe.probe_seconds < 10  # seconds on a loaded 2-core box; ~0.5 s when idle


# -- the cache ---------------------------------------------------------------------------------------

def test_chooser_probes_once_per_process_and_once_per_machine(tmp_path: Path) -> None:
    plain, cl = DEFAULT, Plan(channels_last=True)
    trial = fake_trial({plain: 0.003, cl: 0.001}, {plain: 1.0, cl: 1.0})
    key = {"kind": "test", "model": "m"}
    first = Chooser(lambda: tmp_path)
    assert first.choose(key, [plain, cl], trial).plan == cl
    assert first.choose(key, [plain, cl], trial).plan == cl and first.probes_run == 1
    (stored,) = tmp_path.glob("*.json")
    assert json.loads(stored.read_text())["key"] == key

    def never(plan: Plan) -> fastpath.Step:
        raise AssertionError("the disk cache should have answered")

    second = Chooser(lambda: tmp_path)  # a new worker process on the same machine
    assert second.choose(key, [plain, cl], never).plan == cl and second.probes_run == 0
    assert Chooser(lambda: tmp_path).choose({**key, "model": "other"}, [plain, cl], trial).plan == cl

    stored.write_text("{torn")  # a corrupt entry is measured again, then rewritten
    third = Chooser(lambda: tmp_path)
    assert third.choose(key, [plain, cl], trial).plan == cl and third.probes_run == 1
    # a cached plan that is no longer a candidate is not trusted
    assert Chooser(lambda: tmp_path).choose(key, [plain], fake_trial({plain: 0.001}, {plain: 1.0})).plan == plain


def test_more_threads_are_probed_first_and_never_stored(tmp_path: Path) -> None:
    """Asked for 2 threads on a box where 1 is faster: the thread stage picks 1, the layouts are
    then probed at 1 thread, and nothing reaches the disk (free cores come and go)."""
    cl = Plan(channels_last=True)
    seen: list[Plan] = []

    def trial(plan: Plan) -> fastpath.Step:
        seen.append(plan)
        return fake_trial({plan: 0.001 if plan.threads == 1 else 0.004}, {plan: 1.0})(plan)

    chooser = Chooser(lambda: tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        plan = fastpath.probed_plan("t", model_of("softmax"), torch.zeros(1), [DEFAULT, cl], trial, chooser=chooser)
    finally:
        torch.set_num_threads(threads)
    assert plan.threads == 1 and chooser.probes_run == 2
    assert seen == [DEFAULT, Plan(threads=1), Plan(threads=1), Plan(channels_last=True, threads=1)]
    assert list(tmp_path.glob("*.json")) == []


def test_by_threads_keeps_the_callers_count_first() -> None:
    plans = [Plan(threads=1), DEFAULT, Plan(onednn=False, threads=1), Plan(onednn=False)]
    assert fastpath.by_threads(plans) == {None: [DEFAULT, Plan(onednn=False)],
                                          1: [Plan(threads=1), Plan(onednn=False, threads=1)]}


# -- inversion: vmap over restarts on the CPU ----------------------------------------------------------

def test_worth_vectorizing_is_capped_on_the_cpu() -> None:
    small = 106_000
    # CPU: many restarts of small batches pay; two restarts or 16+ images per restart lose.
    assert worth_vectorizing(1, 1, 8, small, "cpu") and worth_vectorizing(4, 1, 8, small, "cpu")
    assert worth_vectorizing(8, 1, 4, small)  # the CPU is the default
    assert not worth_vectorizing(16, 1, 4, small, "cpu") and not worth_vectorizing(64, 1, 8, small, "cpu")
    assert not worth_vectorizing(8, 1, 2, small, "cpu") and not worth_vectorizing(16, 1, 2, small, "cpu")
    # a GPU keeps the rule it had (>= 8 images in flight, K = 1, a small model)
    assert worth_vectorizing(16, 1, 4, small, "cuda") and worth_vectorizing(64, 1, 8, small, torch.device("cuda"))
    assert not worth_vectorizing(16, 5, 4, small, "cuda") and not worth_vectorizing(4, 1, 4, 11_000_000, "cuda")
    assert not worth_vectorizing(1, 1, 4, small, "cuda")


def test_inversion_objective_in_channels_last_matches_and_is_probed(monkeypatch: pytest.MonkeyPatch) -> None:
    from inversion.objective import UpdateMatcher, model_at
    from inversion.optimizer import objective_plan
    from lab.capture import CapturedUpdate, probe_update

    model = model_of("cnn")
    x, y = batch(4)
    hp = LocalHyperparams(epochs=1, steps=1, batch_size=4, lr=0.01, momentum=0.9, weight_decay=5e-4)
    entry = CapturedUpdate({k: v.clone() for k, v in model.state_dict().items()}, probe_update(model, x, y, hp),
                           4, 1, 0, 0, hp, y, SHAPE)
    matcher = UpdateMatcher(entry, model_at(entry, model), y, tv=1e-2)
    z = torch.randn(2, 4, *SHAPE, generator=torch.Generator().manual_seed(1))
    plain = matcher.autograd_fn()(z)
    fast = matcher.laid_out(True).autograd_fn()(z)
    assert mismatch(list(fast), list(plain)) < TOLERANCE
    assert objective_plan(matcher, z, False, iterations=10) == DEFAULT  # too short to pay for a probe
    monkeypatch.setattr(fastpath, "PROCESS_CHOOSER", Chooser(lambda: None))
    plan = objective_plan(matcher, z, False, iterations=1000)
    assert not plan.pool_first and fastpath.PROCESS_CHOOSER.probes_run == 1
