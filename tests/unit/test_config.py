from pathlib import Path

import pytest

from lab.config import (
    ExperimentConfig,
    dump_yaml,
    load_experiment,
    to_dict,
    with_values,
)
from lab.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads_and_round_trips(path: Path) -> None:
    cfg = load_experiment(path)
    assert isinstance(cfg, ExperimentConfig)
    assert load_experiment(to_dict(cfg)) == cfg


def test_presets_exist() -> None:
    names = {p.name for p in PRESETS}
    assert {"default.yaml", "smoke.yaml", "no-attack.yaml", "cifar10.yaml", "mnist.yaml"} <= names


def test_all_problems_are_reported_at_once_with_key_paths() -> None:
    raw = {
        "dataset": {"nmae": "digits", "target_class": "zero"},
        "training": {"rounds": 0, "lr": -1.0},
        "attack": {"type": "backdoor", "attackers_ratio": 1.5, "boost": "twice"},
        "bogus": {},
    }
    with pytest.raises(ConfigError) as err:
        load_experiment(raw)
    text = "\n".join(err.value.problems)
    for key in ("dataset.nmae", "dataset.target_class", "training.rounds", "training.lr",
                "attack.attackers_ratio", "attack.boost", "bogus"):
        assert key in text, key
    assert len(err.value.problems) >= 7


def test_overrides_apply_nested_keys_and_parse_yaml_values() -> None:
    cfg = load_experiment(ROOT / "experiments/default.yaml",
                          ["training.rounds=3", "capture.rounds=[3]", "capture.probe.model_round=2", "attack.boost=auto",
                           "attack.trigger.size=2", "federated.aggregator.params={beta: 0.1}"])
    assert cfg.training.rounds == 3
    assert cfg.attack.boost == "auto"
    assert cfg.attack.trigger.size == 2
    assert cfg.federated.aggregator.params == {"beta": 0.1}


def test_bad_override_syntax_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        load_experiment(ROOT / "experiments/default.yaml", ["training.rounds"])


def test_impossible_values() -> None:
    with pytest.raises(ConfigError) as err:
        load_experiment({"federated": {"num_clients": 4, "clients_per_round": 9},
                         "dataset": {"source_class": 0, "target_class": 0},
                         "capture": {"enabled": True, "rounds": [99], "top_k": 0}})
    text = " ".join(err.value.problems)
    assert "clients_per_round" in text and "source_class" in text and "capture.rounds[0]" in text
    assert "capture.top_k: must be >= 1" in text


def test_a_disabled_capture_does_not_hold_a_shorter_run_back() -> None:
    with pytest.raises(ConfigError, match=r"capture.rounds\[0\]: round 40 is outside 1..10"):
        load_experiment(ROOT / "experiments/default.yaml", ["training.rounds=10"])
    cfg = load_experiment(ROOT / "experiments/default.yaml", ["training.rounds=10", "capture.enabled=false"])
    assert cfg.training.rounds == 10 and not cfg.capture.enabled


def test_a_probe_cannot_send_a_model_from_after_its_round() -> None:
    with pytest.raises(ConfigError, match=r"capture.probe.model_round: round 5's model cannot be sent in .*\[3\]"):
        load_experiment(ROOT / "experiments/default.yaml", ["capture.rounds=[3, 40]", "capture.probe.model_round=5"])
    with pytest.raises(ConfigError, match="capture.probe.model_round: must be >= 1"):
        load_experiment(ROOT / "experiments/default.yaml", ["capture.probe.model_round=0"])
    cfg = load_experiment(ROOT / "experiments/default.yaml", ["capture.probe.model_round=5"])
    assert cfg.capture.probe is not None and cfg.capture.probe.model_round == 5


def test_attack_needs_attackers_and_ratio_list_is_kept() -> None:
    with pytest.raises(ConfigError, match="attackers_ratio"):
        load_experiment({"attack": {"type": "backdoor", "attackers_ratio": 0.0}})
    cfg = load_experiment({"attack": {"type": "backdoor", "attackers_ratio": [0.1, 0.3]}})
    assert cfg.attack.ratios == (0.1, 0.3)


def test_with_values_and_dump_yaml_round_trip() -> None:
    cfg = with_values(load_experiment({}), ["training.seed=7"])
    assert cfg.seed == 7
    import yaml
    assert load_experiment(yaml.safe_load(dump_yaml(cfg))) == cfg


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such experiment file"):
        load_experiment(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(bad)
