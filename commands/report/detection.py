"""The report's detection section: drop/clip F1 per round, the ROC curve of each rule's suspicion,
the ranking metrics (`lab.detection`) per run, and the rule x attack heatmap (ASR, accuracy, AUC)
with each rule's worst-case attack marked."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from commands.report.blocks import Block, Image, Para, Table
from commands.report.collection import Collection, Run
from commands.report.figures import _plt, _save, plot_detection
from lab.detection import RoundEvidence, evidence_of, roc_from_points, roc_points

# (summary key, panel title, which value is the worst case, colour map)
HEAT_PANELS = (
    ("final_asr", "ASR (worst: highest)", max, "Reds"),
    ("final_accuracy", "clean accuracy (worst: lowest)", min, "Greens"),
    ("auc", "detection AUC (worst: lowest)", min, "Blues"),
)
NO_ATTACK = "no attack"


def _f(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def evidence(run: Run) -> list[RoundEvidence]:
    return [e for m in run.rounds if (e := evidence_of(m)) is not None]


def malicious(run: Run) -> set[int]:
    """The run's attackers: summary.json's list, and every round's `malicious` (an unfinished run)."""
    rows = [p for m in run.rounds for p in m.get("malicious") or ()]
    return {int(p) for p in [*(run.summary.get("malicious_partitions") or ()), *rows]}


def plot_roc(runs: list[Run], path: Path) -> Path:
    """One ROC curve per rule, pooled over its runs (within-round rank percentiles, `lab.detection`)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 5))
    by_rule: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        by_rule[r.rule].append(r)
    for rule, rs in sorted(by_rule.items()):
        curve = roc_from_points([p for r in rs for p in roc_points(evidence(r), malicious(r))])
        if curve is None:
            continue
        aucs = [a for r in rs if (a := (r.summary.get("detection") or {}).get("auc")) is not None]
        label = f"{rule} (AUC {statistics.mean(aucs):.2f})" if aucs else rule
        ax.plot(curve[0], curve[1], label=label)
    ax.plot([0, 1], [0, 1], ":", color="gray", label="chance")
    ax.set(title="ROC of each rule's suspicion", xlabel="false-positive rate (honest clients)",
           ylabel="true-positive rate (attackers)", xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    ax.legend(fontsize=6, loc="lower right")
    return _save(fig, path)


def heat_values(runs: list[Run]) -> tuple[list[str], list[str], dict[str, dict[tuple[str, str], float]]]:
    """(rules, attacks, {summary key: {(rule, attack): mean over the runs (seeds)}})."""
    cells: dict[str, dict[tuple[str, str], list[float]]] = {key: defaultdict(list) for key, *_ in HEAT_PANELS}
    for r in runs:
        source = {**r.summary, "auc": (r.summary.get("detection") or {}).get("auc")}
        for key, *_ in HEAT_PANELS:
            if source.get(key) is not None:
                cells[key][(r.rule, r.attack_label)].append(float(source[key]))
    rules = sorted({r.rule for r in runs})
    attacks = sorted({r.attack_label for r in runs}, key=lambda a: (a == NO_ATTACK, a))
    return rules, attacks, {k: {c: statistics.mean(v) for c, v in cell.items()} for k, cell in cells.items()}


def worst_attacks(rules: list[str], attacks: list[str], values: dict[str, dict[tuple[str, str], float]]
                  ) -> dict[str, dict[str, str]]:
    """{summary key: {rule: its worst-case attack}} over the attacked columns with a value."""
    out: dict[str, dict[str, str]] = {}
    for key, _, worst, _ in HEAT_PANELS:
        out[key] = {}
        for rule in rules:
            cand = {a: values[key][(rule, a)] for a in attacks if a != NO_ATTACK and (rule, a) in values[key]}
            if cand:
                pick = worst(cand.values())
                out[key][rule] = next(a for a, v in cand.items() if v == pick)
    return out


def plot_heatmap(runs: list[Run], path: Path) -> Path:
    """Rule x attack heatmaps of ASR, accuracy and AUC; a black box marks each rule's worst case."""
    plt = _plt()
    from matplotlib.patches import Rectangle

    rules, attacks, values = heat_values(runs)
    worst = worst_attacks(rules, attacks, values)
    if len(attacks) > 6:  # a wide matrix (issue 18's 18 columns): the three panels one above the other
        fig, axes = plt.subplots(3, 1, figsize=(2.5 + 0.62 * len(attacks), 3 * (1.4 + 0.3 * len(rules))), squeeze=False)
        panels = axes[:, 0]
    else:
        fig, axes = plt.subplots(1, 3, figsize=(4 + 1.1 * len(attacks) * 3, 1.2 + 0.42 * len(rules)), squeeze=False)
        panels = axes[0]
    for ax, (key, title, _, cmap) in zip(panels, HEAT_PANELS):
        grid = [[values[key].get((rule, a), float("nan")) for a in attacks] for rule in rules]
        ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        for i, rule in enumerate(rules):
            for j, a in enumerate(attacks):
                v = grid[i][j]
                ax.text(j, i, "-" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7)
                if worst[key].get(rule) == a:
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2))
        ax.set_xticks(range(len(attacks)), attacks, rotation=35, ha="right", fontsize=7)
        ax.set_yticks(range(len(rules)), rules, fontsize=7)
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def detection_rows(runs: list[Run]) -> tuple[tuple[str, ...], ...]:
    rows = []
    for r in runs:
        d = r.summary.get("detection") or {}
        cost = r.summary.get("rule_cost") or {}
        first = d.get("rounds_to_detect") or {}
        caught = [v for v in first.values() if v is not None]
        rtd = f"{len(caught)}/{len(first)}" + (f", by round {max(caught)}" if caught else "") if first else "-"
        rows.append((r.label, _f(d.get("auc")), rtd, _f(d.get("false_alarm_rate")), _f(d.get("precision")),
                     _f(d.get("recall")), _f(d.get("f1")), _f(cost.get("seconds_mean"), ".4f"),
                     _f(cost.get("peak_mb_max"), ".1f")))
    return tuple(rows)


def detection_section(col: Collection, plots: Path) -> list[Block]:
    scored = [r for r in col.runs if r.summary.get("detection") or any(m.get("detection") for m in r.rounds)]
    if not scored:
        return [Para("No run with detection scores.")]
    blocks: list[Block] = []
    f1_runs = [r for r in scored if r.attacked and any((m.get("detection") or {}).get("f1") is not None
                                                       for m in r.rounds)]
    if f1_runs:
        blocks.append(Image(plot_detection(f1_runs, plots / "detection_f1.png"),
                            "Detection F1 per round: the clients each rule dropped or clipped, scored against "
                            "the true attackers."))
    ranked = [r for r in scored if r.attacked and roc_points(evidence(r), malicious(r))]
    if ranked:
        blocks.append(Image(plot_roc(ranked, plots / "detection_roc.png"),
                            "ROC of each rule's per-client suspicion against the true attackers, pooled over "
                            "rounds (and runs) on within-round rank percentiles; the legend gives the pooled AUC "
                            "(the share of within-round attacker-honest pairs ranked right, ties 1/2)."))
    blocks.append(Table(("run", "AUC", "attackers detected", "false alarms", "precision", "recall", "F1",
                         "rule s/round", "rule peak MB"), detection_rows(scored)))
    blocks.append(Para("AUC: pooled ROC AUC of the rule's suspicion. Detected: ranked among the m most suspicious "
                       "clients of a round with m attackers (ties count against), first round given. False "
                       "alarms: share of honest clients dropped or clipped in rounds without an attacker (- when "
                       "there was no such round or the rule never drops or clips). Precision/recall/F1: the "
                       "drops and clips, totals over all rounds; a rule that keeps everyone (FedAvg) has recall "
                       "0. Rule cost: the aggregator call alone, mean seconds and peak extra memory."))
    if len({r.rule for r in scored}) > 1 or len({r.attack_label for r in scored}) > 1:
        blocks.append(Image(plot_heatmap(scored, plots / "detection_heatmap.png"),
                            "Rule x attack: final ASR, clean accuracy and detection AUC (mean over seeds). A black "
                            "box marks each rule's worst-case attack in that panel (no-attack runs excluded)."))
    return blocks
