"""The user-state store: built from events, looked up by key, refused when damaged."""

from __future__ import annotations

import fcntl
import json
import os
import random

import pytest

from tafe.cqs import CqsError
from tafe.cqs.sealed import _directory
from tafe.cqs.state import EVENT_TYPES, NEVER, UserState
from tafe.cqs.store import HEADER_SIZE, StoreError, build_store, key_hash, open_store, write_store

DAY = 86400
AS_OF = 1_750_000_000.0
WINDOWS = {"1d": DAY, "7d": 7 * DAY, "30d": 30 * DAY, "365d": 365 * DAY}
COUNT_FIELDS = {  # field -> (event type, window)
    "views_1d": ("view", "1d"), "views_7d": ("view", "7d"), "views_30d": ("view", "30d"),
    "carts_7d": ("cart", "7d"), "carts_30d": ("cart", "30d"),
    "purchases_30d": ("purchase", "30d"), "purchases_365d": ("purchase", "365d"),
    "shown_1d": ("shown", "1d"), "shown_7d": ("shown", "7d"),
    "clicks_7d": ("click", "7d"), "clicks_30d": ("click", "30d"),
}
RECENCY_FIELDS = {"hours_since_view": "view", "hours_since_cart": "cart",
                  "hours_since_purchase": "purchase", "hours_since_click": "click"}


def reference(events: list[dict], as_of: float) -> dict[str, UserState]:
    """The obvious per-user aggregation, written independently of the store's numpy code."""
    users: dict[str, dict] = {}
    for e in events:
        age = as_of - e["ts"]
        if not 0 <= age < 365 * DAY:
            continue
        u = users.setdefault(e["user"], {f: 0 for f in COUNT_FIELDS} | {f: NEVER for f in RECENCY_FIELDS})
        for field, (kind, window) in COUNT_FIELDS.items():
            if e["type"] == kind and age < WINDOWS[window]:
                u[field] += 1
        for field, kind in RECENCY_FIELDS.items():
            if e["type"] == kind:
                u[field] = min(u[field], int(age // 3600))
    return {key: UserState(**values) for key, values in users.items()}


def make_events(n_users: int = 300, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    events = []
    for u in range(n_users):
        key = f"user-{u}-{rng.getrandbits(40):x}"
        for _ in range(rng.randint(1, 25)):
            # mostly recent, some older than a year, a few in the future (ignored)
            age = rng.choice([rng.uniform(0, 2 * DAY), rng.uniform(0, 40 * DAY), rng.uniform(0, 400 * DAY), -rng.uniform(1, 3600)])
            events.append({"user": key, "ts": AS_OF - age, "type": rng.choice(EVENT_TYPES)})
    return events


def write_events(path, events: list[dict]) -> str:
    with open(path, "w") as f:
        for e in events:
            f.write(json.dumps(e) + "\n")
    return str(path)


@pytest.fixture
def built(tmp_path):
    events = make_events()
    half = len(events) // 2
    files = [write_events(tmp_path / "a.jsonl", events[:half]), write_events(tmp_path / "b.jsonl", events[half:])]
    out = str(tmp_path / "users.cqss")
    info = build_store(files, out, as_of=AS_OF)
    return events, out, info


def test_round_trip_matches_reference_aggregation(built):
    events, out, info = built
    expected = reference(events, AS_OF)
    assert info.users == len(expected) and info.events == len(events)
    with open_store(out) as store:
        assert store.users == len(expected) and store.as_of == AS_OF and store.version == info.version
        for key, state in expected.items():
            assert store.lookup([key]) == state, key
        assert store.lookup(["nobody"]) is None
    assert any(s.hours_since_view == NEVER for s in expected.values())  # the sentinel is exercised
    assert any(s.views_1d > 0 for s in expected.values())


def test_users_with_only_old_or_future_events_are_unknown(tmp_path):
    events = [
        {"user": "old", "ts": AS_OF - 400 * DAY, "type": "view"},
        {"user": "future", "ts": AS_OF + 10, "type": "view"},
        {"user": "edge", "ts": AS_OF, "type": "purchase"},
    ]
    out = str(tmp_path / "s.cqss")
    build_store([write_events(tmp_path / "e.jsonl", events)], out, as_of=AS_OF)
    with open_store(out) as store:
        assert store.users == 1
        assert store.lookup(["old"]) is None and store.lookup(["future"]) is None
        assert store.lookup(["edge"]) == UserState(purchases_30d=1, purchases_365d=1, hours_since_purchase=0)


def test_as_of_defaults_to_last_event_and_version_is_derived(tmp_path):
    events = [{"user": "u", "ts": AS_OF - 7200, "type": "click"}, {"user": "u", "ts": AS_OF, "type": "shown"}]
    out = str(tmp_path / "s.cqss")
    info = build_store([write_events(tmp_path / "e.jsonl", events)], out)
    with open_store(out) as store:
        assert store.as_of == AS_OF == info.as_of
        assert store.lookup(["u"]) == UserState(shown_1d=1, shown_7d=1, clicks_7d=1, clicks_30d=1, hours_since_click=2)
        assert store.version == info.version and store.version.startswith("20250615T")
    build_store([str(tmp_path / "e.jsonl")], out, version="daily-42")
    with open_store(out) as store:
        assert store.version == "daily-42"


def test_lookup_takes_the_first_key_found_in_preference_order(tmp_path):
    events = [{"user": "buyer-1", "ts": AS_OF, "type": "view"}, {"user": "ifa-1", "ts": AS_OF, "type": "cart"}]
    out = str(tmp_path / "s.cqss")
    build_store([write_events(tmp_path / "e.jsonl", events)], out, as_of=AS_OF)
    viewer = UserState(views_1d=1, views_7d=1, views_30d=1, hours_since_view=0)
    carter = UserState(carts_7d=1, carts_30d=1, hours_since_cart=0)
    with open_store(out) as store:
        assert store.lookup(["buyer-1", "ifa-1"]) == viewer
        assert store.lookup(["ifa-1", "buyer-1"]) == carter
        assert store.lookup(["unknown-eid", "", "ifa-1", "buyer-1"]) == carter
        assert store.lookup(["unknown-eid", ""]) is None
        assert store.lookup([]) is None


def test_empty_store(tmp_path):
    out = str(tmp_path / "s.cqss")
    info = build_store([write_events(tmp_path / "e.jsonl", [])], out, as_of=AS_OF)
    assert info.users == 0
    with open_store(out) as store:
        assert store.users == 0 and store.lookup(["anyone"]) is None


def test_many_users_written_from_arrays(tmp_path):
    """The array path (used for 10 M-user benchmarks) with enough users for 2**13 buckets."""
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(3)
    names = [f"ifa-{i}" for i in range(150_000)]
    hashes = np.array([key_hash(k) for k in names], dtype=np.uint64)
    order = np.argsort(hashes)
    records = rng.integers(0, 2**16, (len(names), len(UserState._fields)), dtype=np.uint16)
    out = str(tmp_path / "s.cqss")
    write_store(hashes[order], records[order], out, as_of=AS_OF)
    with open_store(out) as store:
        assert store.users == len(names)
        for i in rng.integers(0, len(names), 3000):
            assert store.lookup([names[i]]) == UserState(*(int(v) for v in records[i]))
        assert store.lookup(["ifa-x"]) is None


def test_bad_event_line_names_file_and_line(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text('{"user": "u", "ts": 1, "type": "view"}\n{"user": "u", "ts": 1, "type": "teleport"}\n')
    with pytest.raises(StoreError, match=r"e\.jsonl:2"):
        build_store([str(path)], str(tmp_path / "s.cqss"))
    assert not os.path.exists(tmp_path / "s.cqss")


def test_write_is_atomic_and_leaves_no_temp_file(built, tmp_path):
    _, out, _ = built
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "users.cqss"]


def _damaged(out: str, tmp_path, name: str, edit) -> str:
    data = bytearray(open(out, "rb").read())
    data = edit(data)
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return str(path)


def _flip(offset: int):
    def edit(data: bytearray) -> bytearray:
        data[offset if offset >= 0 else len(data) + offset] ^= 0x40
        return data
    return edit


@pytest.mark.parametrize(
    "name, edit, message",
    [
        ("record.cqss", _flip(-3), "corrupt data"),
        ("key.cqss", _flip(HEADER_SIZE + 8 * 40), "corrupt data"),
        ("header.cqss", _flip(30), "corrupt header"),
        ("magic.cqss", _flip(0), "bad magic"),
        ("truncated.cqss", lambda d: d[:-100], "truncated"),
        ("half.cqss", lambda d: d[: len(d) // 2], "truncated"),
        ("headless.cqss", lambda d: d[:60], "truncated"),
        ("empty.cqss", lambda d: bytearray(), "truncated"),
        ("trailing.cqss", lambda d: d + b"\0" * 8, "trailing bytes"),
    ],
)
def test_damaged_files_are_refused_with_a_clear_message(built, tmp_path, name, edit, message):
    _, out, _ = built
    path = _damaged(out, tmp_path, name, edit)
    with pytest.raises(StoreError, match=message) as info:
        open_store(path)
    assert path in str(info.value)
    assert isinstance(info.value, CqsError) and isinstance(info.value, ValueError)


def test_the_served_mapping_survives_its_file_truncated_and_rewritten(built):
    """A store rewritten in place must not SIGBUS the process serving it (it serves a copy)."""
    events, out, _ = built
    expected = reference(events, AS_OF)
    data = open(out, "rb").read()
    with open_store(out) as store:
        os.truncate(out, 0)
        assert all(store.lookup([key]) == state for key, state in expected.items())  # SIGBUS if it mapped the file
        with open(out, "r+b") as f:
            f.write(b"\xff" * len(data))  # the same size, other bytes
        assert all(store.lookup([key]) == state for key, state in expected.items())
        store.verify()
        os.unlink(out)
        assert all(store.lookup([key]) == state for key, state in expected.items())


def test_the_copy_is_sealed_against_any_change(built):
    _, out, _ = built
    with open_store(out) as store:
        fd = os.open(f"/proc/self/fd/{store._copy.fd}", os.O_RDWR)  # the memfd, writable if unsealed
        try:
            for change in (lambda: os.ftruncate(fd, 0), lambda: os.ftruncate(fd, 1 << 20), lambda: os.write(fd, b"x")):
                with pytest.raises(PermissionError):
                    change()
            with pytest.raises(PermissionError):
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 0)  # F_SEAL_SEAL: the seals stay
        finally:
            os.close(fd)


def test_stores_of_the_same_content_share_one_copy(built, tmp_path):
    """Workers open the store independently; the bytes must be in memory once."""
    _, out, _ = built
    again = tmp_path / "again.cqss"
    again.write_bytes(open(out, "rb").read())  # another file, the same bytes
    with open_store(out) as a, open_store(str(again)) as b:
        assert os.fstat(a._copy.fd).st_ino == os.fstat(b._copy.fd).st_ino
        link_dir = os.path.dirname(a._copy.link)
        assert len(os.listdir(link_dir)) == 2  # each holder is findable, not only the first
    assert not os.path.exists(link_dir)  # the last holder tidies up


def test_a_dead_holders_copy_is_not_trusted(built, tmp_path):
    """A link left by a process that died (or names a reused pid) is skipped and removed."""
    import subprocess
    import sys

    _, out, _ = built
    code = f"from tafe.cqs.store import open_store; s = open_store({out!r}); print(s._copy.link)"
    link = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert os.path.lexists(link) and not os.path.exists(link)  # dangling: the process exited without closing
    impostor = os.path.join(os.path.dirname(link), "1-99")
    os.symlink(out, impostor)  # the right bytes, but a plain file anyone may truncate
    with open_store(out) as store:
        assert store.users > 0
        assert not os.path.lexists(link) and not os.path.lexists(impostor)
        assert os.listdir(os.path.dirname(link)) == [os.path.basename(store._copy.link)]


def test_a_file_still_being_written_is_refused_not_shared(built, tmp_path):
    _, out, _ = built
    data = open(out, "rb").read()
    with open_store(out) as store:
        partial = tmp_path / "partial.cqss"
        partial.write_bytes(data[: len(data) // 2])  # the same header, half the bytes
        with pytest.raises(StoreError, match="truncated"):
            open_store(str(partial))
        assert store.lookup([next(iter(reference(built[0], AS_OF)))]) is not None


def test_missing_file(tmp_path):
    with pytest.raises(StoreError, match="cannot open"):
        open_store(str(tmp_path / "absent.cqss"))


def test_key_hash_is_stable():
    # a stored key must hash the same in every process and on every machine
    assert key_hash("abc") == 8696274497037089104


def test_closed_store_answers_unknown(built):
    events, out, _ = built
    key, state = next(iter(reference(events, AS_OF).items()))
    store = open_store(out)
    assert store.lookup([key]) == state
    store.close()
    assert store.lookup([key]) is None
    store.close()  # idempotent


def test_an_inconsistent_index_is_refused_even_with_valid_checksums(built, tmp_path):
    """Checksums catch accidents; the cheap structure checks catch a badly written file."""
    import struct
    import zlib

    from tafe.cqs.store import HEADER, _pack_header

    _, out, _ = built
    data = bytearray(open(out, "rb").read())
    magic, fmt, bits, rsize, users, as_of, version, layout, _, _, _ = HEADER.unpack_from(data, 0)
    struct.pack_into("<Q", data, HEADER_SIZE + (1 << bits) * 8, users + 1)  # the index's end is not N
    data[:HEADER_SIZE] = _pack_header(bits, users, as_of, version, zlib.crc32(data[HEADER_SIZE:]))
    path = tmp_path / "index.cqss"
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="corrupt bucket index"):
        open_store(str(path))


def test_a_dead_holders_link_under_another_key_is_swept(built, tmp_path):
    """Links left by killed processes do not pile up under contents no one opens again."""
    _, out, _ = built
    directory = _directory()
    assert directory is not None
    link = os.path.join(directory, "0000dead-1", "1-5")
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink("/proc/0/fd/5", link)  # pid 0 has no /proc entry: dangling, as a killed holder's
    alive = os.path.join(directory, "0000live-1", "1-0")
    os.makedirs(os.path.dirname(alive), exist_ok=True)
    os.symlink(f"/proc/{os.getpid()}/fd/0", alive)  # a live holder's link stays
    try:
        with open_store(out):
            pass
        assert not os.path.lexists(os.path.dirname(link))
        assert os.path.lexists(alive)
    finally:
        for path in (link, alive):
            if os.path.lexists(path):
                os.unlink(path)
            if os.path.isdir(os.path.dirname(path)):
                os.rmdir(os.path.dirname(path))

