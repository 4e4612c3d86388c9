"""The bid path imports nothing of training: serving a model and a store needs no numpy."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from tafe.cqs.state import UserState
from tafe.cqs.store import key_hash, write_store

SERVING = ("tafe.cqs", "tafe.cqs.model", "tafe.cqs.features", "tafe.cqs.state", "tafe.cqs.store", "tafe.cqs.sealed",
           "tafe.cqs.swap", "tafe.cqs.decision_log", "tafe.handlers", "tafe.worker", "tafe.master", "tafe.serve", "tafe.up",
           "tafe.cli")  # fmt: skip

CHILD = """
import sys, json
from tafe.core.request import parse
from tafe.cqs import open_snapshot
for name in {modules!r}:
    __import__(name)
snapshot = open_snapshot({model!r}, {store!r})
request = parse(open({request!r}, "rb").read())
score = snapshot.score(request, request.imps[0], {now!r})
print(json.dumps({{"known": score.known_user, "numpy": sorted(m for m in sys.modules if m.split(".")[0] == "numpy")}}))
"""


def test_serving_modules_and_scoring_import_no_numpy(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")  # to build the store here; the child must not need it
    request = ROOT / "tafe" / "data" / "demo-request.json"
    user = __import__("json").loads(request.read_text())["user"]["buyeruid"]
    store = tmp_path / "users.cqss"
    write_store(np.array([key_hash(user)], dtype=np.uint64), np.ones((1, len(UserState._fields)), dtype=np.uint16), str(store),
                as_of=time.time())  # fmt: skip
    code = CHILD.format(modules=SERVING, model=str(ROOT / "tafe" / "data" / "model.cqsm"), store=str(store),
                        request=str(request), now=time.time())  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    result = __import__("json").loads(proc.stdout)
    assert result == {"known": True, "numpy": []}


@pytest.mark.parametrize("command", [["train", "{tmp}/d.jsonl", "--out", "{tmp}/m.cqsm"], ["pipeline", "--events", "{tmp}", "--out", "{tmp}"]])
def test_training_without_numpy_says_what_to_install_in_one_line(tmp_path: Path, command: list[str]) -> None:
    (tmp_path / "d.jsonl").write_text('{"features": ["a=1"], "outcomes": {"visit": 1}}\n')
    argv = [a.replace("{tmp}", str(tmp_path)) for a in ["cqs", *command]]
    code = f"import sys; sys.modules['numpy'] = None; from tafe.cli import main; sys.exit(main({argv!r}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 1
    assert proc.stderr == f"tafe cqs {command[0]}: needs numpy, which the bid path does not: pip install 'tafe[train]'\n"
