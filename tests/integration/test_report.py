"""`fl-lab report` on hand-made run, demo and sweep folders, and the HTML in a real headless Chromium.

The folders are written here with known numbers (no Flower run), so every table cell checked below
is hand-computable. Chromium comes from Debian's packages: the session fixture installs it with
apt-get when /usr/bin/chromium is missing, and skips (saying why) where that is impossible.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from commands.report import REQUIRED, SWEEP, collect, demo_checks, main, write_report
from lab.artifacts import write_json
from lab.config import dump_yaml, load_experiment
from lab.plots import image_grid

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.integration

MALICIOUS = [3]


def make_run(path: Path, *, rule: str = "fedavg", attack: bool = True, final: tuple[float, float] = (0.9123, 0.75),
             tools: bool = True, sets: tuple[str, ...] = (), auc: float | None = None) -> Path:
    """A finished 3-round run folder: 4 clients, partition 3 malicious; final (accuracy, ASR).

    Suspicion: honest clients 0.1, 0.2, 0.3; the attacker 0.9 under a defense (AUC 1), 0.15 under
    FedAvg (above one of three honest clients: AUC 1/3); `auc` overrides the summary's."""
    sets = (f"federated.aggregator.name={rule}", "training.rounds=3", *sets, *(() if attack else ("attack.type=none",)))
    cfg = load_experiment(ROOT / "experiments" / "smoke.yaml", sets)
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(dump_yaml(cfg))
    rows = [{"round": 0, "accuracy": 0.1, "loss": 2.3, "asr": 0.0}]
    suspicion = {"0": 0.1, "1": 0.2, "2": 0.3, "3": 0.15 if rule == "fedavg" else 0.9}
    round_auc = (1 / 3 if rule == "fedavg" else 1.0) if attack else None
    accs, asrs = [0.5, 0.8, final[0]], [0.2, 0.5, final[1]]
    for r in range(1, 4):
        dropped = [3] if rule != "fedavg" else []
        rows.append({
            "round": r, "accuracy": accs[r - 1], "loss": 1.0 / r, "asr": asrs[r - 1],
            "clients": [0, 1, 2, 3], "malicious": MALICIOUS if attack else [],
            "kept": [c for c in range(4) if c not in dropped], "dropped": dropped, "clipped": None,
            "update_norms": {"0": 1.0 / r, "1": 1.1 / r, "2": 0.9 / r, "3": 3.0 / r},
            "detection": {**({"precision": 1.0, "recall": 1.0, "f1": 1.0} if dropped
                             else {"precision": None, "recall": 0.0, "f1": 0.0}), "scores": suspicion, "auc": round_auc},
            "round_seconds": 1.0, "rule_seconds": 0.002, "rule_peak_mb": 1.5,
        })
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_json(path / "summary.json", {
        "name": cfg.name, "final_accuracy": final[0], "final_asr": final[1], "asr_floor": None, "rounds": 3,
        "strategy": rule, "attack": cfg.attack.type, "seconds": 12.0, "seed": 0, "torch": "2.x-test",
        "detection": {**({"precision": 1.0, "recall": 1.0, "f1": 1.0, "tp": 3, "fp": 0, "fn": 0} if rule != "fedavg"
                         else {"precision": None, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 0, "fn": 3}),
                      "auc": round_auc if auc is None else auc,
                      "rounds_to_detect": {"3": None if rule == "fedavg" else 1} if attack else {},
                      "false_alarm_rate": None if attack else 0.0},
        "rule_cost": {"seconds_mean": 0.002, "seconds_max": 0.003, "peak_mb_max": 1.5, "rounds": 3}})
    if tools:
        entry = path / "inversion" / "round_0003" / "partition_003"
        entry.mkdir(parents=True)
        images = torch.rand(2, 1, 16, 16)
        image_grid([("reconstruction", images), ("ground truth", images)], entry / "recon.png", ["label 0", "label 7"])
        # image 0: classified as the target (0) with a bright trigger box; image 1: neither
        write_json(entry / "metrics.json", {
            "entry": "round_0003/partition_003", "round": 3, "partition_id": 3, "num_images": 2, "psnr": 17.5,
            "ssim": 0.6, "label_accuracy": 1.0, "target_fraction": 0.5, "trigger_contrast": [0.55, -0.1],
            "labels": [0, 7], "predicted": [0, 7], "iterations": 20, "seconds": 3.0, "loss": 0.01})
        write_json(path / "verification.json", {"accuracy": final[0], "asr": final[1], "fires_target": 1,
                                                "num_reconstructions": 2, "reconstructions": []})
        write_json(path / "unlearning" / "metrics.json", {
            "before": {"accuracy": final[0], "asr": final[1], "source_accuracy": 0.2},
            "after": {"transplant": {"accuracy": 0.9068, "asr": 0.0, "source_accuracy": 0.9, "oracle": False, "steps": 10},
                      "clean-finetune": {"accuracy": 0.91, "asr": 0.7, "source_accuracy": 0.3, "oracle": False, "steps": 10}},
            "trigger": {"found": True, "box": {"top": 13, "left": 13, "height": 2, "width": 2}, "pattern_mean": [0.9],
                        "sources": ["round_0003/partition_003[0]"], "scoring": {"box_iou": 1.0}},
            "sanitized": {"strategy": "transplant"}})
    return path


def md_sections(text: str) -> list[str]:
    return re.findall(r"^## (.+)$", text, flags=re.MULTILINE)


def html_images(page: str) -> list[str]:
    return re.findall(r"<img [^>]*src=\"([^\"]+)\"", page)


@pytest.fixture(scope="module")
def run_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = make_run(tmp_path_factory.mktemp("report") / "run")
    assert main([str(run)]) == 0
    return run


def test_run_report_has_every_section_and_the_numbers(run_report: Path) -> None:
    md = (run_report / "report.md").read_text()
    assert md_sections(md) == list(REQUIRED)
    assert "| fedavg | fedavg | backdoor | 3 | 0.9123 | 0.750 |" in md  # the headline row
    assert "1 reconstructed image(s) classified as the target class with the trigger box in place" in md
    assert "accuracy 0.9123 -> 0.9068, ASR 0.750 -> 0.000" in md  # the sanitized (transplant) model
    for png in ("rounds.png", "update_norms.png", "detection_f1.png", "detection_roc.png", "unlearning.png",
                "recon_round_0003_partition_003.png"):
        assert (run_report / "plots" / png).stat().st_size > 5000, png
        assert f"plots/{png}" in md
    assert "torch" in md and "flwr" in md and "python" in md and "seed (training.seed) | 0" in md
    assert "aggregator:" in md  # the resolved config, verbatim
    # the ranking metrics: AUC 1/3, the one attacker never detected, no clean round, the rule's cost
    assert "| fedavg | 0.333 | 0/1 | - | - | 0.000 | 0.000 | 0.0020 | 1.5 |" in md


def test_html_is_self_contained(run_report: Path) -> None:
    page = (run_report / "report.html").read_text()
    srcs = html_images(page)
    assert len(srcs) == (run_report / "report.md").read_text().count("![")
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r"(src|href)=\"(https?:|file:|/)", page)  # nothing fetched from anywhere
    assert all(f">{s}</h2>" in page for s in REQUIRED)


def test_missing_tool_outputs_are_said_not_skipped(tmp_path: Path) -> None:
    run = make_run(tmp_path / "bare", tools=False)
    write_report(run)
    md = (run / "report.md").read_text()
    assert md_sections(md) == list(REQUIRED)
    assert "No reconstructions" in md and "No unlearning results" in md


def test_folder_of_runs_takes_the_floor_from_the_clean_run(tmp_path: Path) -> None:
    make_run(tmp_path / "a-fedavg", final=(0.95, 1.0))
    make_run(tmp_path / "b-defense", rule="median", final=(0.94, 0.125), tools=False)
    make_run(tmp_path / "c-clean", attack=False, final=(0.96, 0.125), tools=False)
    col = collect(tmp_path)
    assert [r.label for r in col.runs] == ["a-fedavg", "b-defense", "c-clean"]
    assert col.primary.label == "a-fedavg"  # the one with inversion/ and unlearning/
    # median has no clean run of its own: FedAvg's clean ASR is the floor of every run
    assert [r.floor for r in col.runs] == [0.125, 0.125, 0.125]
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| b-defense | median | backdoor | 3 | 0.9400 | 0.125 | 0.125 |" in md
    assert 'b-defense: differs in federated.aggregator.name="median"' in md


def test_demo_checks_are_measured_against_the_thresholds(tmp_path: Path) -> None:
    make_run(tmp_path / "fedavg", final=(0.9123, 0.95))
    make_run(tmp_path / "median", rule="median", final=(0.94, 0.2), tools=False)  # 20 points above the floor
    make_run(tmp_path / "clean", attack=False, final=(0.96, 0.0), tools=False)
    write_json(tmp_path / "demo.json", {"runs": [{"dir": "fedavg", "label": "FedAvg", "role": "attack"},
                                                 {"dir": "median", "label": "median", "role": "defense"},
                                                 {"dir": "clean", "label": "clean", "role": "clean"}],
                                        "wall_seconds": 123.0, "step_seconds": {"flower runs": 100.0}})
    # unlearning: ASR 0.95 -> 0 (floor 0) but accuracy 0.9123 -> 0.9068 = 0.55 points lost: met
    met = [ok for _, ok, _ in demo_checks(collect(tmp_path))]
    assert met == [True, False, True, True]
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# FL Security Lab demo")
    assert "| median ASR within 5 points of the floor | NO | ASR 0.200, floor 0.000 |" in md
    assert "Demo wall time: 123 s" in md


def test_sweep_folder_gets_the_results_table(tmp_path: Path) -> None:
    make_run(tmp_path / "runs" / "boosted__fedavg__seed0", final=(0.5, 1.0), tools=False)
    make_run(tmp_path / "runs" / "boosted__median__seed0", rule="median", final=(0.9, 0.0), tools=False)
    (tmp_path / "results.md").write_text("# defenses\n\n| attack | rule | ASR |\n|---|---|---|\n"
                                         "| boosted | fedavg | 1.000 |\n| boosted | median | 0.000 |\n")
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert SWEEP in md_sections(md)
    assert "| boosted | median | 0.000 |" in md
    assert (tmp_path / "plots" / "rounds_backdoor.png").exists()  # lab.plots.sweep_plots, one per attack


def test_rule_by_attack_heatmap_marks_each_rules_worst_attack(tmp_path: Path) -> None:
    from commands.report.detection import heat_values, worst_attacks

    runs = tmp_path / "runs"
    make_run(runs / "plain__fedavg", final=(0.95, 0.9), tools=False)
    make_run(runs / "boost__fedavg", final=(0.93, 1.0), tools=False, sets=("attack.boost=5",))
    make_run(runs / "plain__median", rule="median", final=(0.90, 0.6), tools=False, auc=0.4)
    make_run(runs / "boost__median", rule="median", final=(0.94, 0.1), tools=False, sets=("attack.boost=5",), auc=0.8)
    make_run(runs / "clean__median", rule="median", attack=False, final=(0.80, 0.0), tools=False)
    col = collect(tmp_path)
    rules, attacks, values = heat_values(col.runs)
    assert rules == ["fedavg", "median"]
    assert attacks == ["backdoor", "backdoor, boost 5.0", "no attack"]
    worst = worst_attacks(rules, attacks, values)
    assert worst["final_asr"] == {"fedavg": "backdoor, boost 5.0", "median": "backdoor"}
    # the clean run's lower accuracy (0.80) is not an attack's doing: left out of the worst case
    assert worst["final_accuracy"] == {"fedavg": "backdoor, boost 5.0", "median": "backdoor"}
    assert worst["auc"] == {"fedavg": "backdoor", "median": "backdoor"}  # 1/3 = 1/3: the first; 0.4 < 0.8
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "plots/detection_heatmap.png" in md and "plots/detection_roc.png" in md
    assert (tmp_path / "plots" / "detection_heatmap.png").stat().st_size > 5000


def test_not_a_run_folder_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path)]) == 2
    assert "no run folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# A real browser


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's Chromium, installed with apt-get when missing (root only); else the test is skipped."""
    if CHROMIUM.exists():
        return CHROMIUM
    apt = shutil.which("apt-get")
    if apt is None:
        pytest.skip(f"{CHROMIUM} is missing and apt-get is not available to install it")
    if os.geteuid() != 0:
        pytest.skip(f"{CHROMIUM} is missing; installing it needs root: sudo apt-get install -y chromium")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in ([apt, "update"], [apt, "install", "-y", "--no-install-recommends", "chromium"]):
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
        if res.returncode != 0:
            pytest.skip(f"`{' '.join(cmd)}` failed ({res.returncode}): {(res.stdout + res.stderr)[-500:]}")
    if not CHROMIUM.exists():
        pytest.skip(f"apt-get installed chromium but {CHROMIUM} is still missing")
    return CHROMIUM


def browser(binary: Path, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(binary), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)


def test_report_renders_in_headless_chromium(run_report: Path, chromium: Path, tmp_path: Path) -> None:
    page = run_report / "report.html"
    shot = tmp_path / "report.png"
    res = browser(chromium, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2000", f"file://{page}")
    assert shot.exists(), res.stdout + res.stderr
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000  # a blank page is a few kB
    dom = browser(chromium, tmp_path / "profile2", "--dump-dom", f"file://{page}").stdout
    srcs = html_images(dom)
    assert len(srcs) >= 5 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert all(f">{s}</h2>" in dom for s in REQUIRED)
    # The screenshot is a test artifact: beside the report, and in a folder that outlives tmp_path.
    keep = Path(tempfile.gettempdir()) / "fl-lab-test-artifacts"
    keep.mkdir(exist_ok=True)
    shutil.copyfile(shot, run_report / "report-screenshot.png")
    shutil.copyfile(shot, keep / "report-screenshot.png")
    sys.stdout.write(f"\nreport screenshot: {keep / 'report-screenshot.png'}\n")
