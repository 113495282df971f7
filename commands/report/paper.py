"""The paper-against-lab figure of a `fl-lab reproduce` folder: per cell, the range the paper's
value allows (value +- tolerance, or a bound) as a bar, the lab's mean +- sd over seeds as a dot,
coloured by the verdict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from commands.report.figures import _plt, _save

VERDICT_COLOURS = {"reproduced": "tab:green", "off": "tab:red", "lab-only": "tab:gray"}


def allowed_range(expect: dict[str, Any] | None, values: dict[str, float | None]) -> tuple[float, float] | None:
    """[low, high] that an expectation accepts on the metric's 0..1 scale; a relative one around the
    other cell's mean (`values`: cell id -> our mean); None without an expectation."""
    if not expect:
        return None
    if "relative_to" in expect:
        other = values.get(expect["relative_to"])
        if other is None:
            return None
        if "max_delta" in expect:
            return other - expect["max_delta"], other + expect["max_delta"]
        return other + expect.get("min", -1.0), other + expect.get("max", 1.0)
    if "value" in expect:
        return expect["value"] - expect["tolerance"], expect["value"] + expect["tolerance"]
    return expect.get("min", 0.0), expect.get("max", 1.0)


def plot_paper_vs_lab(reproduction: dict[str, Any], path: Path) -> Path:
    """One row per cell: the paper's accepted range (the proxy's own measured range too, for a
    proxy run) and the lab's value."""
    plt = _plt()
    cells = reproduction["cells"]
    ours = {c["id"]: (c.get("ours") or {}).get("mean") for c in cells}
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(cells) + 1.4))
    for y, cell in enumerate(cells):
        paper = allowed_range((cell.get("paper") or {}).get("expect"), ours)
        if paper is not None:
            ax.plot([max(paper[0], -0.02), min(paper[1], 1.02)], [y, y], lw=6, color="tab:blue", alpha=0.25,
                    solid_capstyle="butt", label="paper's range" if y == 0 or "paper's range" not in
                    ax.get_legend_handles_labels()[1] else None)
        mean, sd = ours[cell["id"]], (cell.get("ours") or {}).get("sd")
        if mean is not None:
            colour = VERDICT_COLOURS.get(cell.get("verdict"), "black")
            ax.errorbar([mean], [y], xerr=[[sd or 0.0], [sd or 0.0]], fmt="o", color=colour, ms=5, capsize=2)
    for verdict, colour in VERDICT_COLOURS.items():
        ax.plot([], [], "o", color=colour, label=f"lab: {verdict}")
    ax.set_yticks(range(len(cells)), [f"{c['id']} ({c['metric']})" + (", not run" if c.get("verdict") == "not-run"
                                                                       else "") for c in cells], fontsize=6)
    ax.invert_yaxis()
    kind = "CPU proxy, dots coloured by its own measured bounds" if reproduction.get("proxy") else "paper setting"
    if reproduction.get("subset"):
        kind = f"subset {reproduction['subset']}"
    ax.set(xlim=(-0.03, 1.03), xlabel="metric value (error, ASR or accuracy, per cell)",
           title=f"{reproduction.get('card', '')}: paper against lab\n({kind})")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=6, loc="lower right")
    return _save(fig, path)
