"""Validation of the backdoor attacks' own settings (DBA, Blended, Neurotoxin, A3FL, edge-case):
impossible values as 'key.path: reason' strings, for `lab.validation.validate`."""

from __future__ import annotations

from lab.schema import ExperimentConfig

# The tasks an edge-case backdoor's Fashion-MNIST images are out of distribution for (lab.edge_case).
DIGIT_TASKS = frozenset({"digits", "mnist", "emnist-digits"})


def dba_parts(cfg: ExperimentConfig, ratio: float) -> int:
    """DBA's k: `attack.dba_parts`, or one part per attacker (at least 2: one part is no split)."""
    a = cfg.attack
    return a.dba_parts if a.dba_parts is not None else max(2, round(ratio * cfg.federated.num_clients))


def backdoor_problems(cfg: ExperimentConfig) -> list[str]:
    a, f = cfg.attack, cfg.federated
    p: list[str] = []
    if a.dba_parts is not None and a.type != "dba":
        p.append(f"attack.dba_parts: is DBA's setting; attack.type is {a.type!r} (leave it null)")
    if a.type == "dba":
        if a.dba_parts is not None and a.dba_parts < 2:
            p.append(f"attack.dba_parts: DBA splits the trigger into at least 2 parts, got {a.dba_parts}")
        pixels = a.trigger.size * a.trigger.size
        for i, r in enumerate(a.ratios):
            if r <= 0:
                continue
            where = f"attack.attackers_ratio[{i}]" if isinstance(a.attackers_ratio, tuple) else "attack.attackers_ratio"
            k, attackers = dba_parts(cfg, r), round(r * f.num_clients)
            if attackers < k:
                fix = f"set dba_parts <= {attackers}" if attackers >= 2 else "DBA needs at least 2 attackers"
                p.append(f"attack.dba_parts: DBA gives each of its {k} trigger parts to at least one attacker, but "
                         f"{where}={r} of {f.num_clients} clients makes {attackers} attacker(s) ({fix})")
            if k > pixels:
                p.append(f"attack.dba_parts: {k} parts of a {a.trigger.size}x{a.trigger.size} trigger leave a part "
                         "without pixels; raise attack.trigger.size")
    if not 0 < a.blend_alpha <= 1:
        p.append("attack.blend_alpha: must be in (0, 1] (the blended pattern's opacity)")
    if not 0 <= a.neurotoxin_topk < 1:
        p.append("attack.neurotoxin_topk: must be in [0, 1) (the share of coordinates left alone)")
    if a.a3fl_trigger_steps < 1:
        p.append("attack.a3fl_trigger_steps: must be >= 1")
    if not a.a3fl_trigger_lr > 0:
        p.append("attack.a3fl_trigger_lr: must be > 0")
    if a.a3fl_adversary_steps < 0:
        p.append("attack.a3fl_adversary_steps: must be >= 0 (0: no adversarial adaptation)")
    if a.a3fl_adversary_weight < 0:
        p.append("attack.a3fl_adversary_weight: must be >= 0")
    if a.type == "edge-case" and cfg.dataset.name not in DIGIT_TASKS:
        p.append(f"attack.type: edge-case uses Fashion-MNIST images as its out-of-distribution set, against a "
                 f"digits task ({', '.join(sorted(DIGIT_TASKS))}); dataset.name is {cfg.dataset.name!r}")
    if not 0 <= a.edge_case_class < 10:
        p.append("attack.edge_case_class: must be a Fashion-MNIST class in [0, 10)")
    return p
