"""Hot swap through a real TAFE process: requests keep flowing while stores are dropped in."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, start_tafe
from tafe.cqs.state import UserState
from tafe.cqs.store import key_hash, write_store

DEMO = (ROOT / "tafe" / "data" / "demo-request.json").read_bytes()
USER = json.loads(DEMO)["user"]["buyeruid"]


def make_store(path: Path, version: str) -> bytes:
    np = pytest.importorskip("numpy")
    names = [USER] + [f"other-{i}" for i in range(5000)]
    hashes = np.array([key_hash(k) for k in names], dtype=np.uint64)
    records = np.ones((len(names), len(UserState._fields)), dtype=np.uint16)
    order = np.argsort(hashes)
    write_store(hashes[order], records[order], str(path), as_of=time.time(), version=version)
    return path.read_bytes()


class Client(threading.Thread):
    """One keep-alive connection sending the demo request back to back."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.address = urllib.parse.urlsplit(url).netloc
        self.stop = threading.Event()
        self.statuses: dict[int, int] = {}
        self.versions: list[str] = []
        self.errors: list[str] = []
        self.no_bids: list[int] = []

    def run(self) -> None:
        conn = http.client.HTTPConnection(self.address, timeout=5)
        while not self.stop.is_set():
            try:
                conn.request("POST", "/openrtb2/bid", DEMO, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                body = resp.read()
            except Exception as exc:  # noqa: BLE001 - every failure is a lost request
                self.errors.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection(self.address, timeout=5)
                continue
            self.statuses[resp.status] = self.statuses.get(resp.status, 0) + 1
            answer = json.loads(body) if resp.status == 200 else {}
            if "nbr" in answer:  # a no-bid (--nbr-in-response): only a missed deadline is acceptable
                self.no_bids.append(answer["nbr"])
            elif resp.status == 200:
                self.versions.append(answer["ext"]["cqs"]["store"])
        conn.close()

    def wait_version(self, version: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not (self.versions and self.versions[-1] == version):
            assert time.monotonic() < deadline, f"store {version} never served; last {self.versions[-1:]}"
            time.sleep(0.05)


def wait_output(server, text: str, count: int = 1, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while server.output().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{server.output()}"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_stores_swapped_while_serving_lose_no_request(tmp_path, workers):
    """With 2 workers SIGHUP goes to the master, a rolling restart: the new workers
    must come up on the last good store (s1), not the configured one (s0)."""
    watch_dir = tmp_path / "watch"
    watch_dir.mkdir()
    make_store(tmp_path / "s0.cqss", "s0")
    server = start_tafe("--store", str(tmp_path / "s0.cqss"), "--watch-dir", str(watch_dir), "--workers", str(workers),
                        "--nbr-in-response")
    clients = [Client(server.url) for _ in range(4)]
    try:
        for c in clients:
            c.start()
        for c in clients:
            c.wait_version("s0")
        good = make_store(watch_dir / "s1.cqss", "s1")
        for c in clients:
            c.wait_version("s1")

        # a truncated store dropped in is refused; s1 keeps serving
        (watch_dir / ".s2.tmp").write_bytes(good[: len(good) // 2])
        (watch_dir / ".s2.tmp").rename(watch_dir / "s2.cqss")
        wait_output(server, "refused store", count=workers)  # each worker refuses it
        assert "truncated" in server.output() and str(watch_dir / "s2.cqss") in server.output()
        server.proc.send_signal(signal.SIGHUP)  # retries it (in new workers if pre-forked), refuses it again
        wait_output(server, "refused store", count=2 * workers)
        n = len(clients[0].versions)
        while len(clients[0].versions) < n + 20:
            time.sleep(0.02)
        assert set(clients[0].versions[n:]) == {"s1"}

        make_store(watch_dir / "s3.cqss", "s3")
        for c in clients:
            c.wait_version("s3")
        # Each worker swaps on its own, and the clients' connections may all be on one
        # of them: the gauge (the max over live workers) settles when every one has.
        want = ['tafe_cqs_active_info{kind="store",version="s3"} 1.0', 'tafe_cqs_active_info{kind="store",version="s1"} 0.0']
        deadline = time.monotonic() + 20
        while True:
            with urllib.request.urlopen(server.admin_url + "/metrics", timeout=5) as resp:
                metrics = resp.read().decode()
            if all(line in metrics for line in want) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert all(line in metrics for line in want), [ln for ln in metrics.splitlines() if "cqs_active" in ln]
    finally:
        for c in clients:
            c.stop.set()
        for c in clients:
            c.join(10)
        code = server.stop()
    assert code == 0, server.output()
    for c in clients:
        assert not c.errors, c.errors[:3]
        assert set(c.statuses) == {200}, c.statuses
        # on this shared 2-core machine a request may miss its 100 ms deadline (nbr 15);
        # any other no-bid would mean a swap broke scoring
        assert set(c.no_bids) <= {15} and len(c.no_bids) < sum(c.statuses.values()) / 100, c.no_bids
        assert sum(c.statuses.values()) > 20
        seen = [v for i, v in enumerate(c.versions) if i == 0 or c.versions[i - 1] != v]
        assert seen == ["s0", "s1", "s3"], seen  # in order, never back
