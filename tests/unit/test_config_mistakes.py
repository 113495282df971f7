"""A careless user's experiment files: every mistake is a ConfigError naming its key, never a
traceback and never a run that starts (`commands.preflight.check_experiment`, what `fl-lab run
--check` calls, adds the rule's build-time checks to the file's own)."""

from __future__ import annotations

from pathlib import Path

import pytest

from commands.preflight import check_experiment
from lab.config import load_experiment
from lab.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "experiments" / "smoke.yaml"


def problems_of(source: object, overrides: list[str] | tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(ConfigError) as err:
        check_experiment(source, overrides)  # type: ignore[arg-type]
    return err.value.problems


def file_with(tmp_path: Path, content: str | bytes) -> Path:
    path = tmp_path / "exp.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


# ---------------------------------------------------------------------------------------------- the file itself


@pytest.mark.parametrize("content", ["", "\n\n", "# only a comment\n", "---\n", "null\n"])
def test_an_empty_file_is_refused(tmp_path: Path, content: str) -> None:
    with pytest.raises(ConfigError, match="empty"):
        load_experiment(file_with(tmp_path, content))


def test_an_explicit_empty_mapping_means_the_defaults(tmp_path: Path) -> None:
    assert load_experiment(file_with(tmp_path, "{}\n")) == load_experiment({})


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="UTF-8"):
        load_experiment(file_with(tmp_path, b"name: caf\xe9\ntraining: {rounds: 2}\n"))


def test_a_folder_or_deep_nesting_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_experiment(tmp_path)
    with pytest.raises(ConfigError):
        load_experiment(file_with(tmp_path, "a: " + "[" * 5000 + "]" * 5000 + "\n"))


# ---------------------------------------------------------------------------------------------- values


def test_an_alias_bomb_or_a_self_referring_alias_is_refused_before_anything_expands(tmp_path: Path) -> None:
    levels = ['a: &a [x, x, x, x, x, x, x, x, x, x]']
    levels += [f"{n}: &{n} [{', '.join(['*' + p] * 10)}]" for p, n in zip("abcdefgh", "bcdefghi")]
    bomb = file_with(tmp_path, "\n".join(levels) + "\nname: bomb\n")  # 10^9 values from 400 bytes
    with pytest.raises(ConfigError, match=r"expand to [\d,]+ values \(at most 100,000\): an alias bomb"):
        load_experiment(bomb)
    with pytest.raises(ConfigError, match="an alias refers to a node that contains it"):
        load_experiment(file_with(tmp_path, "a: &a [1, *a]\nname: x\n"))
    # anchors as people use them still load
    shared = file_with(tmp_path, "training: {rounds: &r 4, eval_every: *r}\n")
    assert load_experiment(shared).training.eval_every == 4


def test_a_seed_numpy_and_torch_cannot_take_is_refused_at_config_time() -> None:
    for seed in ("99999999999999999999999", "-1", str(2**32)):
        assert any(p.startswith("training.seed:") for p in problems_of(SMOKE, [f"training.seed={seed}"])), seed
    assert load_experiment(SMOKE, [f"training.seed={2**32 - 1}"]).seed == 2**32 - 1


def test_a_trigger_larger_than_the_image_is_refused_at_config_time() -> None:
    # smoke: digits at image_size 16
    assert any(p.startswith("attack.trigger.size:") and "16x16" in p
               for p in problems_of(SMOKE, ["attack.trigger.size=40"]))
    assert any(p.startswith("attack.trigger.size:") for p in problems_of(SMOKE, ["attack.trigger.margin=15"]))
    # the dataset's native size when image_size is not set: digits 28, cifar10 32
    assert any("28x28" in p for p in problems_of(SMOKE, ["dataset.image_size=null", "attack.trigger.size=28"]))
    load_experiment(SMOKE, ["dataset.image_size=null", "attack.trigger.size=27"])
    load_experiment(SMOKE, ["dataset.image_size=64", "attack.trigger.size=40"])
    cifar = ["dataset.name=cifar10", "dataset.image_size=null", "attack.trigger.size=31"]
    assert load_experiment(SMOKE, cifar).attack.trigger.size == 31
    assert any("32x32" in p for p in problems_of(SMOKE, [*cifar, "attack.trigger.margin=2"]))


@pytest.mark.parametrize("override, key", [
    ("training.lr=.inf", "training.lr"),
    ("attack.boost=.inf", "attack.boost"),
    ("attack.noise_std=.inf", "attack.noise_std"),
    ("federated.server_lr=.inf", "federated.server_lr"),
    ("training.lr=.nan", "training.lr"),
    ("attack.boost=-.inf", "attack.boost"),
    ("execution.checkpoint_every=0", "execution.checkpoint_every"),
    ("attack.trigger.margin=-1", "attack.trigger.margin"),
    ("training.rounds=99999999999999999999999", "training.rounds"),
    ("federated.aggregator={name: flame, params: {noise_lambda: .nan}}", "federated.aggregator.params.noise_lambda"),
    ("federated.aggregator={name: iqr-filter, params: {iqr_k: .nan}}", "federated.aggregator.params.iqr_k"),
    ("federated.aggregator={name: clip-avg-iqr, params: {iqr_k: .nan}}", "federated.aggregator.params.iqr_k"),
    ("federated.aggregator={name: fedavg, params: {weighted: x}}", "federated.aggregator.params.weighted"),
    ("federated.aggregator={name: multi-krum, params: {weighted: 1}}", "federated.aggregator.params.weighted"),
    ("federated.aggregator={name: norm-clip, params: {max_norm: .inf}}", "federated.aggregator.params.max_norm"),
    ("federated.aggregator={name: krum, params: {num_byzantine: 1.5}}", "federated.aggregator.params.num_byzantine"),
    ("federated.aggregator={name: fedavg, params: {1: 2}}", "federated.aggregator.params"),
])
def test_values_accepted_without_complaint_before_are_refused_with_their_key(override: str, key: str) -> None:
    problems = problems_of(SMOKE, [override])
    assert any(p.startswith(key + ":") for p in problems), problems


def test_names_are_plain_names_not_paths() -> None:
    for bad in ("..", ".", "/tmp/x", "a/b", "../up", "", "a\\b", "-x"):
        assert any(p.startswith("name:") for p in problems_of({"name": bad})), bad
    for good in ("smoke", "demo-fedavg", "run_1.2", "A", "my run"):
        assert load_experiment({"name": good}).name == good


# ---------------------------------------------------------------------------------------------- numbers as people write them


def test_exponent_floats_as_people_write_them(tmp_path: Path) -> None:
    path = file_with(tmp_path, SMOKE.read_text() + "\nexecution: {client_cpus: 2E0}\n")
    cfg = load_experiment(path, ["attack.boost=1e30", "training.lr=1E-3", "training.weight_decay=5e-4",
                                 "federated.aggregator={name: clip-avg, params: {clip_gamma: 2e0}}"])
    assert cfg.attack.boost == 1e30 and cfg.training.lr == 1e-3 and cfg.execution.client_cpus == 2.0
    assert cfg.federated.aggregator.params == {"clip_gamma": 2.0}
    text = SMOKE.read_text().replace("boost: 1.0", "boost: 1e30").replace("lr: 0.05", "lr: 5e-2")
    cfg = load_experiment(file_with(tmp_path, text))
    assert cfg.attack.boost == 1e30 and cfg.training.lr == 0.05
    assert any(p.startswith("attack.noise_std:") for p in problems_of(SMOKE, ["attack.noise_std=-2e5"]))
    # integers and names stay what they were
    cfg = load_experiment(SMOKE, ["training.rounds=3", "name=1e5x"])
    assert cfg.training.rounds == 3 and cfg.name == "1e5x"


def test_the_yaml_fix_does_not_leak_into_pyyaml() -> None:
    import yaml

    assert yaml.safe_load("1e30") == "1e30"


# ---------------------------------------------------------------------------------------------- every problem at once


def test_every_problem_of_every_stage_is_named_at_once(tmp_path: Path) -> None:
    path = file_with(tmp_path, "training: {rounds: -1, lr: fast}\n"
                               "federated: {aggregator: {name: nope}}\n"
                               "attack: {type: backdoor, attackers_ratio: 0.3, trigger: {size: 40}}\n")
    text = "\n".join(problems_of(path))
    for key in ("training.rounds", "training.lr", "unknown rule 'nope'", "attack.trigger.size"):
        assert key in text, (key, text)


def test_rule_checks_come_with_the_files_own_problems() -> None:
    problems = problems_of(SMOKE, ["training.rounds=0", "federated.aggregator={name: krum, params: {num_byzantine: 3}}"])
    assert any(p.startswith("training.rounds:") for p in problems)
    assert any("krum" in p and "clients_per_round" in p for p in problems)


def test_a_rule_check_is_not_run_on_a_default_that_stands_in_for_a_mistake() -> None:
    # clients_per_round could not be read, so krum's n > 2f + 2 would be checked against a guess
    problems = problems_of(SMOKE, ["federated.clients_per_round=eight",
                                   "federated.aggregator={name: krum, params: {num_byzantine: 1}}"])
    assert problems == [p for p in problems if p.startswith("federated.clients_per_round:")]


# ---------------------------------------------------------------------------------------------- rule defaults


@pytest.mark.parametrize("rule", ["clip-avg", "clip-avg-iqr"])
def test_clipping_rules_run_with_their_documented_defaults(rule: str) -> None:
    from strategies.clipping import DEFAULT_CLIP_DECAY, DEFAULT_CLIP_GAMMA

    cfg = check_experiment(SMOKE, [f"federated.aggregator={{name: {rule}}}"])
    assert cfg.federated.aggregator.params == {}
    assert (DEFAULT_CLIP_GAMMA, DEFAULT_CLIP_DECAY) == (1.5, 0.3)  # the seed study (bench/RESULTS.md)
