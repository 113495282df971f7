"""`fl-lab demo --quick` end to end: three real Flower simulations side by side, `fl-lab invert`,
`verify`, `unlearn` and `report`, through the real command line (about a minute on an idle 2-core box)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from commands.report import REQUIRED

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("demo") / "demo"
    res = subprocess.run([sys.executable, "-m", "commands.cli", "demo", "--quick", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=900, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out, res


def test_every_step_ran_and_left_its_files(quick_demo: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, _ = quick_demo
    meta = json.loads((out / "demo.json").read_text())
    assert [r["role"] for r in meta["runs"]] == ["attack", "defense", "clean"]
    for r in meta["runs"]:
        summary = json.loads((out / r["dir"] / "summary.json").read_text())
        assert summary["rounds"] == 3
    attack = out / meta["runs"][0]["dir"]
    assert json.loads((attack / "summary.json").read_text())["strategy"] == "fedavg"
    assert json.loads((out / meta["runs"][1]["dir"] / "summary.json").read_text())["strategy"] == meta["defense"]
    assert yaml.safe_load((out / "no-attack" / "config.yaml").read_text())["attack"]["type"] == "none"
    inv = list((attack / "inversion").glob("*/*/metrics.json"))
    assert inv and all((p.parent / "recon.png").exists() for p in inv)
    assert (attack / "verification.json").exists()
    un = json.loads((attack / "unlearning" / "metrics.json").read_text())
    assert set(un["after"]) == {"clean-finetune"} and (attack / "unlearning" / "sanitized.safetensors").exists()
    assert meta["capture"]["modes"] == ["suspects"] and not meta["capture"]["upper_bound"]
    assert len(meta["capture"]["captured"]) == 2  # the top-2 suspects of 4 clients
    assert meta["wall_seconds"] > 0 and set(meta["step_seconds"]) >= {"flower runs", "inversion", "unlearning"}
    for key in ("python", "torch", "flwr", "cpu"):
        assert meta["environment"][key]


def test_terminal_shows_progress_and_a_summary(quick_demo: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, res = quick_demo
    for step in range(1, 6):
        assert f"[{step}/5]" in res.stdout
    for label in (r["dir"] for r in json.loads((out / "demo.json").read_text())["runs"]):
        assert f"[{label}] round   3/3" in res.stdout  # a progress line per round per run
    assert "== summary" in res.stdout and "demo wall time" in res.stdout
    assert "capture: honest (suspects" in res.stdout and "UPPER BOUND" not in res.stdout
    assert re.search(r"FedAvg, backdoor\s+fedavg\s+\d\.\d{4}", res.stdout)


def test_report_has_every_section_with_embedded_images(quick_demo: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, _ = quick_demo
    md = (out / "report.md").read_text()
    assert re.findall(r"^## (.+)$", md, flags=re.MULTILINE) == list(REQUIRED)
    assert "| demo check | met | measured |" in md and "--quick" in md
    for png in ("rounds.png", "update_norms.png", "detection_f1.png", "unlearning.png"):
        assert (out / "plots" / png).exists()
    assert list((out / "plots").glob("recon_*.png"))
    page = (out / "report.html").read_text()
    srcs = re.findall(r"<img [^>]*src=\"([^\"]+)\"", page)
    assert len(srcs) == md.count("![") >= 5
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
