"""Plots (matplotlib, PNG) for sweeps and reports. Headless: the Agg backend, nothing shown."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lab.artifacts import read_jsonl  # noqa: E402


def sweep_plots(out: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """Accuracy and ASR per round per rule (one figure per attack), and ASR vs poison ratio."""
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    written = []
    by_attack: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_attack[str(r.get("attack", r["attack_type"]))].append(r)
    for attack, rs in by_attack.items():
        fig, (ax_acc, ax_asr) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
        for ax in (ax_acc, ax_asr):
            ax.set_prop_cycle(color=plt.cm.tab20.colors)  # 15 rules: the default cycle repeats at 10
        seen = set()
        for r in rs:
            label = str(r.get("federated.aggregator", r["rule"]))
            if (label, r.get("attack.poison_ratio")) in seen or r["seed"] != rs[0]["seed"]:
                continue  # one curve per rule (first seed, first poison ratio)
            seen.add((label, r.get("attack.poison_ratio")))
            # Rounds without central evaluation (training.eval_every) have null metrics: leave them out.
            metrics = [m for m in read_jsonl(Path(r["run"]) / "metrics.jsonl")
                       if m["round"] > 0 and m.get("accuracy") is not None]
            ax_acc.plot([m["round"] for m in metrics], [m["accuracy"] for m in metrics], label=label)
            ax_asr.plot([m["round"] for m in metrics],
                        [float("nan") if m.get("asr") is None else m["asr"] for m in metrics], label=label)
        ax_acc.set(title=f"clean accuracy ({attack})", xlabel="round", ylim=(0, 1.02))
        ax_asr.set(title=f"attack success rate ({attack})", xlabel="round", ylim=(-0.02, 1.02))
        ax_asr.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = plots / f"rounds_{_safe(attack)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if any("attack.poison_ratio" in r for r in rows):
        fig, ax = plt.subplots(figsize=(6, 4))
        curves: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            if r["attack_type"] != "none" and r.get("asr") is not None:
                curves[str(r.get("federated.aggregator", r["rule"]))][float(r["attack.poison_ratio"])].append(r["asr"])
        for label, pts in curves.items():
            xs = sorted(pts)
            ax.plot(xs, [sum(pts[x]) / len(pts[x]) for x in xs], marker="o", label=label)
        ax.set(xlabel="poison ratio", ylabel="final ASR", ylim=(-0.02, 1.02), title="ASR vs poison ratio")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = plots / "asr_vs_poison_ratio.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def image_grid(rows: list[tuple[str, Any]], path: Path, titles: list[str] | None = None) -> Path:
    """One row of images per (label, tensor (N, C, H, W) in [0, 1]) pair, saved as a PNG."""
    n = max(int(t.shape[0]) for _, t in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.6 * n + 0.8, 1.7 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < images.shape[0]:
                img = images[c].detach().clamp(0, 1).permute(1, 2, 0).numpy()
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
                if r == 0 and titles is not None and c < len(titles):
                    ax.set_title(titles[c], fontsize=7)
            else:
                ax.axis("off")
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
