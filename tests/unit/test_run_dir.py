"""Run folders: a new run in one of the lab's own run folders replaces the earlier run's results and
keeps the user's own files; a folder the lab did not create is never cleaned, and never reused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from commands.launch import prepare_run_dir
from lab.runfolder import RUN_MARKER
from lab.config import load_experiment
from lab.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "experiments/smoke.yaml"
OLD_RUN = ("metrics.jsonl", "summary.json", "final.safetensors", "verification.json", "notes.txt",
           "checkpoints/round_0001.safetensors", "captures/manifest.jsonl", "inversion/x/recon.png",
           "unlearning/metrics.json")


def old_run(folder: Path, marked: bool = True) -> None:
    for name in OLD_RUN:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("old")
    if marked:
        (folder / RUN_MARKER).write_text("")


def files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_a_new_run_clears_the_earlier_runs_artifacts_only(tmp_path: Path) -> None:
    old_run(tmp_path)
    prepare_run_dir(load_experiment(SMOKE), tmp_path)
    assert files(tmp_path) == [RUN_MARKER, "config.yaml", "notes.txt"]


def test_a_resumed_run_keeps_what_it_continues_from(tmp_path: Path) -> None:
    old_run(tmp_path)
    prepare_run_dir(load_experiment(SMOKE, ["execution.resume=true"]), tmp_path)
    assert not (tmp_path / "summary.json").exists()
    for kept in ("metrics.jsonl", "checkpoints/round_0001.safetensors", "captures/manifest.jsonl"):
        assert (tmp_path / kept).read_text() == "old"


def test_a_new_or_empty_folder_becomes_a_run_folder(tmp_path: Path) -> None:
    new = prepare_run_dir(load_experiment(SMOKE), tmp_path / "a" / "b")
    assert new == (tmp_path / "a" / "b").resolve() and (new / RUN_MARKER).is_file()
    (tmp_path / "empty").mkdir()
    assert (prepare_run_dir(load_experiment(SMOKE), tmp_path / "empty") / RUN_MARKER).is_file()
    # and it is reused as one
    prepare_run_dir(load_experiment(SMOKE), tmp_path / "empty")


def test_a_folder_the_lab_did_not_create_is_refused_and_left_untouched(tmp_path: Path) -> None:
    old_run(tmp_path, marked=False)
    before = files(tmp_path)
    with pytest.raises(ConfigError, match=RUN_MARKER):
        prepare_run_dir(load_experiment(SMOKE), tmp_path)
    assert files(tmp_path) == before


def test_out_dot_in_the_repository_root_deletes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for pkg in ("inversion", "unlearning", "lab"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("# source\n")
    (tmp_path / "README.md").write_text("# repo\n")
    before = files(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError):
        prepare_run_dir(load_experiment(SMOKE), Path("."))
    with pytest.raises(ConfigError):  # `name: ..` under output_dir `inversion`
        prepare_run_dir(load_experiment(SMOKE), Path("inversion") / "..")
    assert files(tmp_path) == before


def test_a_file_where_the_folder_should_be_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    for target in (tmp_path / "f", tmp_path / "f" / "run"):
        with pytest.raises(ConfigError):
            prepare_run_dir(load_experiment(SMOKE), target)
    assert (tmp_path / "f").read_text() == "x"


def test_fl_lab_run_refuses_a_foreign_folder_with_one_line_and_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from commands.cli import main

    old_run(tmp_path, marked=False)
    before = files(tmp_path)
    assert main(["run", str(SMOKE), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert RUN_MARKER in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert files(tmp_path) == before
    assert not (tmp_path / ".flwr").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every folder")
def test_an_unreadable_folder_is_a_config_error(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "x").write_text("x")
    locked.chmod(0)
    try:
        with pytest.raises(ConfigError):
            prepare_run_dir(load_experiment(SMOKE), locked)
    finally:
        locked.chmod(0o700)


def test_fl_lab_demo_cleans_only_its_own_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from commands.demo import main as demo

    for name in ("plots/mine.png", "fedavg/notes.txt", "report.md"):  # a folder the lab did not create
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("mine")
    before = files(tmp_path)
    assert demo(["--quick", "--out", str(tmp_path)]) == 2
    assert RUN_MARKER in capsys.readouterr().err
    assert files(tmp_path) == before


# ---------------------------------------------------------------------------------------------- sweeps and cards


def test_a_sweep_or_card_folder_must_be_new_empty_or_the_labs(tmp_path: Path) -> None:
    from commands.preflight import COLLECTION_MARKER, claim_collection_dir, collection_dir_problem

    assert collection_dir_problem(tmp_path / "new") is None and collection_dir_problem(tmp_path) is None
    older = tmp_path / "older"  # made by the lab before the marker: only its own entries, runs/ among them
    (older / "runs" / "a").mkdir(parents=True)
    (older / "results.md").write_text("| rule |")
    assert collection_dir_problem(older) is None
    project = tmp_path / "project"
    project.mkdir()
    (project / "results.md").write_text("my own results")  # a name the lab writes, but not the lab's folder
    assert "holds files the lab did not write (results.md)" in (collection_dir_problem(project) or "")
    for name in ("README.md", "src", "notes.txt", "setup.cfg"):
        (project / name).write_text("x")
    problem = collection_dir_problem(project) or ""
    assert "(README.md, notes.txt, setup.cfg and 1 more)" in problem and "touch" in problem
    claim_collection_dir(project)  # the user adopts it: from then on it is the lab's
    assert (project / COLLECTION_MARKER).is_file() and collection_dir_problem(project) is None
    (tmp_path / "file").write_text("x")
    assert "exists and is not a folder" in (collection_dir_problem(tmp_path / "file") or "")


def test_fl_lab_sweep_and_reproduce_refuse_out_dot_in_a_project_before_anything_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from commands.cli import main

    root = Path(__file__).resolve().parents[2]
    (tmp_path / "results.md").write_text("the user's own")
    (tmp_path / "paper.tex").write_text("x")
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(root / "experiments/sweeps/defenses.yaml"), "--out", "."]) == 2
    assert main(["reproduce", str(root / "experiments/papers/poisoning-guide.yaml"), "--quick", "--out", "."]) == 2
    err = capsys.readouterr().err
    assert err.count("holds files the lab did not write (paper.tex)") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["paper.tex", "results.md"]
    assert (tmp_path / "results.md").read_text() == "the user's own"
