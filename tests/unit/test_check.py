"""`fl-lab run --check EXP.yaml`: validate everything, start nothing. A fuzz test mutates a valid
experiment (types, values, deleted and added keys, raw bytes, overrides): the answer is always
exit 0 with one "ok:" line, or exit 2 with every problem named, never a traceback."""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from commands.cli import main
from lab.log import PACKAGES

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "experiments" / "smoke.yaml"
BASE: dict[str, Any] = yaml.safe_load(SMOKE.read_text())
KEYS = {
    "name": None,
    "dataset": ["name", "image_size", "source_class", "target_class", "test_fraction", "server_fraction"],
    "federated": ["num_clients", "clients_per_round", "fraction", "partitioning", "dirichlet_alpha", "server_lr",
                  "aggregator"],
    "training": ["model", "rounds", "local_epochs", "local_steps", "batch_size", "lr", "momentum", "seed"],
    "attack": ["type", "attackers_ratio", "start_round", "end_round", "poison_mode", "poison_ratio", "trigger",
               "boost", "norm_bound", "noise_std"],
    "capture": ["enabled", "rounds", "clients", "probe", "max_bytes"],
    "execution": ["output_dir", "num_threads", "client_cpus", "device", "checkpoint_every", "resume"],
}
RULES = ["fedavg", "krum", "multi-krum", "median", "trimmed-mean", "bulyan", "foolsgold", "fl-defender", "fltrust",
         "norm-clip", "rfout-1d", "iqr-filter", "clip-avg", "clip-avg-iqr", "flame", "nope"]
HP = ["num_byzantine", "num_selected", "beta", "weighted", "iqr_k", "clip_gamma", "clip_decay", "bound", "noise_lambda",
      "max_norm", "noise_std", "kappa", "percentile", "threshold", "ddof", "method", "sides", "noise", "bogus"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 50), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["auto", "cnn", "digits", "1e30", ".inf", "..", "/tmp", "-2e5", "x"]),
)
# Values a person might mean, so that a share of the mutations is valid and reaches the rule checks.
plausible = st.sampled_from([0, 1, 2, 3, 4, 8, 16, 0.1, 0.5, 1.0, 1e-3, True, False, None, "auto", "iid", "cnn", "mlp",
                             "backdoor", "none", "digits", "min", "fence", [1], [0.1, 0.3], {}])
values = st.one_of(plausible, st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=6))


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, list[str]]:
    """(file content, --set overrides) derived from smoke.yaml."""
    data = yaml.safe_load(SMOKE.read_text())
    for _ in range(draw(st.integers(0, 4))):
        section = draw(st.sampled_from(sorted(KEYS)))
        fields = KEYS[section]
        op = draw(st.sampled_from(["set", "delete", "add", "section", "rule"]))
        if op == "section" or fields is None:
            data[section] = draw(values)
        elif not isinstance(data.get(section), dict):
            data[section] = {}
        elif op == "set":
            data[section][draw(st.sampled_from(fields))] = draw(values)
        elif op == "delete":
            data[section].pop(draw(st.sampled_from(fields)), None)
        elif op == "add":
            data[section][draw(st.text(min_size=1, max_size=8))] = draw(values)
        else:
            params = draw(st.dictionaries(st.sampled_from(HP), values, max_size=3))
            data["federated"] = {**(data.get("federated") if isinstance(data.get("federated"), dict) else {}),
                                 "aggregator": {"name": draw(st.sampled_from(RULES)), "params": params}}
    raw = yaml.safe_dump(data, allow_unicode=True).encode()
    if draw(st.integers(0, 9)) == 0:  # raw bytes: flip, insert or replace everything
        how = draw(st.sampled_from(["insert", "replace", "all"]))
        junk = draw(st.binary(min_size=1, max_size=8))
        at = draw(st.integers(0, len(raw)))
        raw = {"insert": raw[:at] + junk + raw[at:], "replace": raw[:at] + junk + raw[at + len(junk):],
               "all": junk}[how]
    overrides = draw(st.lists(st.builds(
        lambda k, v, text: f"{k}={text if text is not None else yaml.safe_dump(v, default_flow_style=True).strip()}",
        st.sampled_from([f"{s}.{f}" if f else s for s, fs in KEYS.items() for f in (fs or [None])] + ["a..b", "=x"]),
        values, st.one_of(st.none(), st.text(max_size=6)),
    ), max_size=2)) if draw(st.booleans()) else []
    return raw, overrides


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def test_the_unmutated_experiment_passes(scratch: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--check", str(SMOKE), "--out", str(scratch / "run")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: ") and len(out.strip().splitlines()) == 1
    assert not (scratch / "run").exists()  # --check creates nothing


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(case=mutated())
def test_any_mutation_is_either_ok_or_exit_2_with_the_problems_named(
        case: tuple[bytes, list[str]], scratch: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw, overrides = case
    path = scratch / "exp.yaml"
    path.write_bytes(raw)
    capsys.readouterr()
    for name in PACKAGES:  # the lab's log handler keeps the stderr of the test that configured it first
        for handler in logging.getLogger(name).handlers:
            if getattr(handler, "_fl_lab", False):
                handler.stream = sys.stderr
    argv = ["run", "--check", str(path), "--out", str(scratch / "out")] + (["--set", *overrides] if overrides else [])
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    # a rule may warn (rfout-1d that cannot fire at this round size): a log line, not a problem
    err = "".join(line for line in err.splitlines(keepends=True) if not ("WARNING" in line and "strategies." in line))
    if code == 0:
        assert out.startswith("ok: ") and not err, err
    else:
        assert code == 2, (code, err)
        assert err.startswith("fl-lab: invalid experiment:") and not out
        head, *rest = err.splitlines()
        # one problem on the first line, or a list: every further line is one named problem
        assert (not rest and head.split(":", 2)[-1].strip()) or (rest and all(
            line.startswith("  - ") and ":" in line and len(line) > 6 for line in rest)), err


def test_fl_lab_run_check_as_a_process(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: {rounds: -1}\nfederated: {aggregator: {name: nope}}\n"
                   "attack: {type: backdoor, attackers_ratio: 0.3, trigger: {size: 40}}\n")
    cmd = [sys.executable, "-m", "commands.cli", "run", "--check"]
    res = subprocess.run([*cmd, str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 2, res.stderr
    for key in ("training.rounds", "unknown rule 'nope'", "attack.trigger.size"):
        assert key in res.stderr
    assert "Traceback" not in res.stderr and not res.stdout
    res = subprocess.run([*cmd, "experiments/smoke.yaml", "--set", "training.rounds=3", "--out", str(tmp_path / "r")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok: ") and "3 rounds" in res.stdout
    assert not (tmp_path / "r").exists()
