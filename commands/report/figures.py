"""The report's figures (matplotlib Agg via lab.plots, which sets the backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from commands.report.collection import Run


def _plt() -> Any:
    from lab.plots import plt  # the Agg backend is chosen there

    return plt


def _save(fig: Any, path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        if ax.get_xlabel() == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


def plot_rounds(runs: list[Run], path: Path) -> Path:
    """Clean accuracy and ASR per round, one line per run (no-attack runs dashed)."""
    plt = _plt()
    fig, (ax_acc, ax_asr) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for r in runs:
        # Only the evaluated rounds (training.eval_every): a line joins them across the others.
        evaluated = [m for m in r.rounds if m.get("accuracy") is not None]
        xs = [m["round"] for m in evaluated]
        style = "--" if not r.attacked else "-"
        marker = "." if len(evaluated) < len(r.rounds) else None
        ax_acc.plot(xs, [m["accuracy"] for m in evaluated], style, marker=marker, label=r.label)
        ax_asr.plot(xs, [m["asr"] if m.get("asr") is not None else float("nan") for m in evaluated], style,
                    marker=marker, label=r.label)
    ax_acc.set(title="clean accuracy", xlabel="round", ylim=(0, 1.02))
    ax_asr.set(title="attack success rate (ASR)", xlabel="round", ylim=(-0.02, 1.02))
    ax_asr.legend(fontsize=7)
    return _save(fig, path)


def plot_norms(runs: list[Run], path: Path) -> Path:
    """Every client's update norm per round, attackers in red; hollow markers = dropped by the rule."""
    plt = _plt()
    cols = min(3, len(runs))
    rows = (len(runs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False, sharey=True)
    for ax, r in zip(axes.flat, runs):
        pts: dict[tuple[bool, bool], tuple[list[int], list[float]]] = {}
        for m in r.rounds:
            attackers = {str(p) for p in m.get("malicious") or []}
            out = {str(p) for p in m.get("dropped") or []}
            for pid, norm in (m.get("update_norms") or {}).items():
                if norm is None or norm <= 0:  # log scale
                    continue
                xs, ys = pts.setdefault((pid in attackers, pid in out), ([], []))
                xs.append(m["round"])
                ys.append(norm)
        for (bad, dropped), (xs, ys) in sorted(pts.items()):
            color = "tab:red" if bad else "tab:blue"
            ax.scatter(xs, ys, s=14, marker="^" if bad else "o", alpha=0.75,
                       facecolors="none" if dropped else color, edgecolors=color,
                       label=f"{'attacker' if bad else 'honest'}{', dropped' if dropped else ''}")
        ax.set(title=r.label, xlabel="round", yscale="log")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    axes[0][0].set_ylabel("update norm ||client - global||")
    return _save(fig, path)


def plot_detection(runs: list[Run], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for r in runs:
        xs = [m["round"] for m in r.rounds if (m.get("detection") or {}).get("f1") is not None]
        ys = [m["detection"]["f1"] for m in r.rounds if (m.get("detection") or {}).get("f1") is not None]
        ax.plot(xs, ys, marker=".", label=r.label)
    ax.set(title="detection F1 per round (the rule's drops vs the true attackers)", xlabel="round",
           ylabel="F1", ylim=(-0.02, 1.02))
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_unlearning(m: dict[str, Any], floor: float | None, path: Path) -> Path:
    """Accuracy and ASR before unlearning and after each strategy (the oracle hatched)."""
    plt = _plt()
    names = ["before", *m["after"]]
    vals = [m["before"], *m["after"].values()]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in ((axes[0], "accuracy", "clean accuracy"), (axes[1], "asr", "ASR")):
        heights = [v.get(key) or 0.0 for v in vals]
        bars = ax.bar(range(len(names)), heights, color=["tab:gray"] + ["tab:green"] * (len(names) - 1))
        for bar, v in zip(bars, vals):
            if v.get("oracle"):
                bar.set_hatch("//")
                bar.set_facecolor("white")
                bar.set_edgecolor("tab:green")
        for i, h in enumerate(heights):
            ax.text(i, h + 0.01, f"{h:.3f}", ha="center", fontsize=7)
        if key == "asr" and floor is not None:
            ax.axhline(floor, color="black", linestyle=":", label=f"floor {floor:.3f}")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(names)), [n + (" (oracle)" if v.get("oracle") and "oracle" not in n else "") for n, v in zip(names, vals)],
                      rotation=20, fontsize=7)
        ax.set(title=f"{title}: before / after unlearning", ylim=(0, 1.1))
    return _save(fig, path)


