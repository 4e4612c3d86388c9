"""Training and evaluation on the synthetic world, through the real ``tafe cqs`` commands."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tafe.cli import main
from tafe.cqs import CqsError
from tafe.cqs import model as model_mod
from tafe.cqs.offline import train


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    assert main(["cqs", "synth", "--out", str(out), "--users", "3000", "--requests", "40000", "--seed", "11"]) == 0
    return out


@pytest.fixture(scope="module")
def trained(world: Path) -> Path:
    path = world / "model.cqsm"
    assert main(["cqs", "train", str(world / "decisions.jsonl"), "--out", str(path), "--dims", "65536", "--version", "t-1"]) == 0
    return path


def test_trained_auc_close_to_hidden_model(world: Path, trained: Path) -> None:
    model = model_mod.load(str(trained))
    assert model.version == "t-1" and [h.name for h in model.heads] == ["visit", "click", "purchase"]
    report = train.evaluate_files(model, [str(world / "decisions.jsonl")], holdout=0.2)
    visit = report["heads"]["visit"]
    assert 7000 < report["records"] < 9000  # the held-out fifth only
    assert visit["known_users"] + visit["unknown_users"] == report["records"] and visit["unknown_users"] > 1000
    assert visit["truth_auc"] > 0.65  # the world is learnable at all
    assert visit["auc"] >= visit["truth_auc"] - 0.02, visit
    assert visit["ece"] < 0.03  # calibrated: mean predicted tracks observed per bin
    for h in ("click", "purchase"):
        assert report["heads"][h]["auc"] > 0.6


def test_evaluate_prints_report(world: Path, trained: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "tafe", "cqs", "evaluate", str(trained), str(world / "decisions.jsonl")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "head visit: AUC 0." in proc.stdout and "hidden model: AUC" in proc.stdout
    assert "known users: AUC 0." in proc.stdout and "unknown users: AUC 0." in proc.stdout
    assert proc.stdout.count("\n  ") >= 3 * 11  # a calibration table of 10 bins (+ header) per head
    proc = subprocess.run([sys.executable, "-m", "tafe", "cqs", "evaluate", "--json", str(trained), str(world / "decisions.jsonl")],
                          capture_output=True, text=True, timeout=120)
    report = json.loads(proc.stdout)
    assert len(report["heads"]["visit"]["calibration"]) == 10


def test_inspect_and_bad_model_exit_code(tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["cqs", "inspect", str(trained)]) == 0
    assert "version       t-1" in capsys.readouterr().out
    assert main(["cqs", "inspect", "--top", "5", "--names", str(trained.parent / "decisions.jsonl"), str(trained)]) == 0
    out = capsys.readouterr().out
    assert "head click:" in out and re.search(r"\]\s+[+-]\d\.\d{4}\s+\S+=", out)  # weights named by feature
    bad = tmp_path / "bad.cqsm"
    bad.write_bytes(trained.read_bytes()[:1000])
    assert main(["cqs", "inspect", str(bad)]) == 1
    assert "refused" in capsys.readouterr().err


def test_records_without_outcomes_skipped_and_garbage_refused(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text(
        json.dumps({"request_id": "a", "imp_id": "1", "features": ["x=1"], "outcomes": {"visit": 1}}) + "\n"
        + json.dumps({"request_id": "b", "imp_id": "1", "features": ["x=2"]}) + "\n\n"
        + json.dumps({"request_id": "c", "imp_id": "1", "features": ["x=2"], "outcomes": {}}) + "\n"
    )
    data = train.read([str(log)], 1024, ["visit", "click"], 0.0)
    assert data.rows == 2 and data.skipped == 1
    assert list(data.labels["visit"]) == [1, 0] and list(data.labels["click"]) == [0, 0]
    log.write_text("not json\n")
    with pytest.raises(CqsError, match="log.jsonl:1"):
        train.read([str(log)], 1024, ["visit"], 0.0)


def test_auc_and_calibration_helpers() -> None:
    y = np.array([0, 0, 1, 1.0])
    assert train.auc(np.array([0.1, 0.4, 0.35, 0.8]), y) == 0.75
    assert train.auc(np.array([0.5, 0.5, 0.5, 0.5]), y) == 0.5
    table = train.calibration(np.array([0.1, 0.2, 0.8, 0.9]), y, bins=2)
    assert [r["observed"] for r in table] == [0.0, 1.0]
