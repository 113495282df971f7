"""`fl-lab verify` / `fl-lab unlearn` (= python -m unlearning) on a tiny backdoored run folder.

The folder is built in-process (no Flower run): a 16x16 digits CNN trained with 20 % stamped,
relabelled batches, saved as final.safetensors, and "reconstructions" that are stamped
source-class test images plus one clean image, as `fl-lab invert` would leave them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lab.artifacts import load_tensors, save_tensors
from lab.config import dump_yaml, load_experiment
from lab.data import load_data
from lab.metrics import evaluate
from lab.task import build_for, state_of
from lab.triggers import make_trigger
from tests.tiny_backdoor import TINY as TINY_BASE
from tests.tiny_backdoor import train_tiny_backdoor
from unlearning.cli import main, unlearn_main, verify_main

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
TINY = {**TINY_BASE, "unlearning": {"steps": 40}}
# The tiny model needs the larger step, and a patience window longer than its accuracy dip: under
# torch 2.14.1, 40 steps with patience 3 stopped transplant at step 30 with nothing kept (validation
# 0.85-0.88 at steps 10-30 against a 0.93 floor); 60 steps with patience 6 end every strategy at
# ASR 0 within 2 points of the original accuracy (bench/RESULTS.md, 2026-11-30).
FAST = ["--quiet", "--steps", "60", "--lr", "0.01", "--patience", "6"]


def make_run(out: Path, **overrides: object) -> Path:
    cfg = load_experiment({**TINY, **overrides})
    data, trig, model = train_tiny_backdoor(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_yaml(cfg))
    save_tensors(out / "final.safetensors", state_of(model))
    ones = data.test.x[data.test.y == 1]
    recon = torch.cat([trig.stamp(ones[:2]), data.test.x[data.test.y == 5][:1]])
    save_tensors(out / "inversion/round_0002/partition_003/recon.safetensors",
                 {"images": recon, "labels": torch.tensor([0, 0, 5])})
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("tiny") / "run")


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("unlearning", "verification.json"))
    return dst


def test_verify_writes_accuracy_asr_and_what_each_reconstruction_triggers(
        run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert verify_main([str(run_dir)]) == 0
    v = json.loads((run_dir / "verification.json").read_text())
    cfg = load_experiment(run_dir / "config.yaml")
    data = load_data(cfg.dataset, cfg.seed)
    model = build_for(cfg, data)
    model.load_state_dict(load_tensors(run_dir / "final.safetensors"))
    ev = evaluate(model, data.test, make_trigger(cfg.attack.trigger, 16, 16), 0, 1)
    assert v["accuracy"] == pytest.approx(ev.accuracy) and v["asr"] == pytest.approx(ev.asr) and v["asr"] > 0.9
    assert v["source_accuracy"] == pytest.approx(ev.source_accuracy)
    assert [r["fires_target"] for r in v["reconstructions"]] == [True, True, False]
    assert v["fires_target"] == 2 and v["num_reconstructions"] == 3
    assert v["reconstructions"][0]["entry"] == "round_0002/partition_003"
    assert "2/3 reconstructions fire" in capsys.readouterr().out


def test_verify_image_classifies_a_png(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    recon = load_tensors(run_dir / "inversion/round_0002/partition_003/recon.safetensors")["images"]
    png = tmp_path / "recon.png"
    Image.fromarray((recon[0, 0].numpy() * 255).round().astype("uint8")).resize((32, 32)).save(png)
    assert verify_main([str(run_dir), "--image", str(png)]) == 0
    out = capsys.readouterr().out
    assert "recon.png: predicted class 0" in out and "target 0: FIRED" in out


def test_unlearn_writes_models_and_metrics_and_marks_the_oracle(
        run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_of(run_dir, tmp_path)
    assert main([str(run), "--oracle", *FAST]) == 0
    m = json.loads((run / "unlearning/metrics.json").read_text())
    assert set(m["after"]) == {"transplant", "relabel", "clean-finetune", "oracle"}
    for key in ("accuracy", "asr", "source_accuracy"):
        assert key in m["before"] and all(key in a for a in m["after"].values())
    assert m["oracle"] is True and m["oracle_strategies"] == ["oracle"]
    assert m["after"]["oracle"]["oracle"] is True and "UPPER BOUND" in m["after"]["oracle"]["note"]
    assert not any(a["oracle"] for n, a in m["after"].items() if n != "oracle")
    assert m["sanitized"]["strategy"] == "transplant"
    t = m["trigger"]
    assert t["found"] and t["box"] == {"top": 12, "left": 12, "height": 3, "width": 3}
    assert t["scoring"]["box_iou"] == 1.0 and "SCORING ONLY" in t["scoring"]["note"]
    assert m["before"]["asr"] - m["after"]["transplant"]["asr"] > 0.5
    assert t["refined"]["server_flip_rate"] >= t["server_flip_rate"] - 1e-9  # the fit only strengthens it
    assert t["family"]["boxes"] and len(t["family"]["boxes"]) == len(t["family"]["flip_rates"])
    assert m["hyperparams"]["box_slack"] == 1 and m["hyperparams"]["refine_steps"] == 100
    assert set(m["capture"]) >= {"modes", "upper_bound"}
    assert m["capture"]["upper_bound"] is ("malicious" in m["capture"]["modes"])
    meta = json.loads(json.dumps(__import__("safetensors").safe_open(
        str(run / "unlearning/oracle.safetensors"), "pt").metadata()))
    assert meta["oracle"] == "true"
    sanitized = load_tensors(run / "unlearning/sanitized.safetensors")
    transplant = load_tensors(run / "unlearning/transplant.safetensors")
    assert all(torch.equal(sanitized[k], transplant[k]) for k in sanitized)
    assert "ORACLE upper bound" in capsys.readouterr().out


def _assert_refused(args: list[str], run: Path, message: str, capsys: pytest.CaptureFixture[str],
                    code: int = 2) -> None:
    assert unlearn_main(args) == code
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (run / "unlearning").exists()


def test_no_reconstructions_exit_2_nothing_written(run_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_of(run_dir, tmp_path)
    shutil.rmtree(run / "inversion")
    _assert_refused([str(run), *FAST], run, "no reconstructions", capsys)
    (run / "inversion").mkdir()
    _assert_refused([str(run), *FAST], run, "no reconstructions", capsys)


def test_checkpoint_that_does_not_fit_exit_2(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_of(run_dir, tmp_path)
    state = load_tensors(run / "final.safetensors")
    state.pop(sorted(state)[-1])
    save_tensors(run / "final.safetensors", state)
    _assert_refused([str(run), *FAST], run, "does not fit", capsys)
    (run / "final.safetensors").write_bytes(b"not a safetensors file")
    _assert_refused([str(run), *FAST], run, "does not fit", capsys)


def test_no_clean_data_exit_2(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_of(run_dir, tmp_path)
    cfg = load_experiment(run / "config.yaml", ["dataset.server_fraction=0"])
    (run / "config.yaml").write_text(dump_yaml(cfg))
    _assert_refused([str(run), *FAST], run, "no clean data", capsys)


def test_oracle_only_on_explicit_request(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_of(run_dir, tmp_path)
    _assert_refused([str(run), "--strategy", "oracle", "--strategy", "transplant", *FAST], run, "--oracle", capsys)


def test_a_trigger_the_server_cannot_confirm_is_refused_unless_forced(
        run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Reconstructions that fire because they really are zeros: occlusion finds their dark centre,
    which sends about 15 % of the server's clean digits to 0 (the planted patch: about 100 %)."""
    run = copy_of(run_dir, tmp_path)
    cfg = load_experiment(run / "config.yaml")
    zeros = load_data(cfg.dataset, cfg.seed).test.x[load_data(cfg.dataset, cfg.seed).test.y == 0][:3]
    save_tensors(run / "inversion/round_0002/partition_003/recon.safetensors",
                 {"images": zeros, "labels": torch.tensor([0, 0, 0])})
    args = [str(run), "--strategy", "transplant", *FAST, "--min-flip-rate", "0.5"]
    _assert_refused(args, run, "refusing to unlearn: the recovered trigger", capsys, code=3)
    assert main([*args, "--force"]) == 0
    t = json.loads((run / "unlearning/metrics.json").read_text())["trigger"]
    assert t["server_flip_rate"] < 0.5 and t["confirmation"]["forced"] is True
    assert t["scoring"]["box_iou"] == 0.0
    # the planted patch passes the same check
    good = copy_of(run_dir, tmp_path / "good")
    assert main([str(good), "--strategy", "transplant", *FAST, "--min-flip-rate", "0.5"]) == 0


def test_python_m_unlearning_exit_code_and_no_traceback(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "unlearning", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 2 and "not a run folder" in res.stderr and "Traceback" not in res.stderr
