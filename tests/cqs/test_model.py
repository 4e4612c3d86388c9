"""Model file format: round trip, and every kind of bad file refused with a clear error."""

from __future__ import annotations

import json
import struct
from array import array
from pathlib import Path

import pytest

from tafe.core.types import BidRequest, Imp
from tafe.cqs import CqsError, Score, open_snapshot
from tafe.cqs import model as model_mod
from tafe.settings import Settings


def _model(dims: int = 256) -> model_mod.Model:
    heads = tuple(
        model_mod.Head(name, bias, array("f", [((i * 7 + k) % 13 - 6) / 10 for i in range(dims)]))
        for k, (name, bias) in enumerate([("visit", -0.5), ("click", -3.0)])
    )
    return model_mod.Model("test-1", dims, heads, meta={"note": "unit test"})


def test_round_trip(tmp_path: Path) -> None:
    m = _model()
    path = tmp_path / "m.cqsm"
    m.save(str(path))
    back = model_mod.load(str(path))
    assert back.version == "test-1" and back.dims == 256 and back.meta == {"note": "unit test"}
    assert [h.name for h in back.heads] == ["visit", "click"]
    for a, b in zip(m.heads, back.heads):
        assert a.bias == b.bias and a.weights == b.weights
    assert back.to_bytes() == m.to_bytes()
    assert back.predict([1, 2, 3]) == m.predict([1, 2, 3])


def _write(tmp_path: Path, data: bytes) -> str:
    path = tmp_path / "bad.cqsm"
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("cut", [0, 5, 20, 100, -1, -4, -5])
def test_truncated_refused(tmp_path: Path, cut: int) -> None:
    data = _model().to_bytes()
    path = _write(tmp_path, data[:cut])
    with pytest.raises(CqsError, match=r"bad\.cqsm.*refused"):
        model_mod.load(path)


def test_flipped_byte_refused(tmp_path: Path) -> None:
    data = bytearray(_model().to_bytes())
    data[len(data) // 2] ^= 0x40
    with pytest.raises(CqsError, match="checksum"):
        model_mod.load(_write(tmp_path, bytes(data)))


def test_other_faults_named(tmp_path: Path) -> None:
    good = _model().to_bytes()
    with pytest.raises(CqsError, match="not a CQS model"):
        model_mod.load(_write(tmp_path, b"GARBAGE!" + good[8:]))
    with pytest.raises(CqsError, match="format version 9"):
        model_mod.load(_write(tmp_path, good[:8] + struct.pack("<I", 9) + good[12:]))
    with pytest.raises(CqsError, match="padded"):
        model_mod.load(_write(tmp_path, good + b"\0\0\0\0"))
    with pytest.raises(CqsError, match="cannot read"):
        model_mod.load(str(tmp_path / "missing.cqsm"))
    other_spec = model_mod.Model("x", 256, _model().heads, feature_spec="someone-else/3").to_bytes()
    with pytest.raises(CqsError, match="feature spec"):
        model_mod.load(_write(tmp_path, other_spec))
    nan = model_mod.Model("x", 256, (model_mod.Head("visit", 0.0, array("f", [float("nan")] * 256)),)).to_bytes()
    with pytest.raises(CqsError, match="non-finite"):
        model_mod.load(_write(tmp_path, nan))


def test_header_is_documented_json(tmp_path: Path) -> None:
    data = _model().to_bytes()
    magic, fmt, hlen = struct.unpack_from("<8sII", data)
    header = json.loads(data[16 : 16 + hlen])
    assert (magic, fmt) == (b"TAFECQSM", 1)
    assert header["dims"] == 256 and header["hash"] == "crc32" and header["heads"][0]["name"] == "visit"


def test_demo_model_scores_unknown_users_reasonably() -> None:
    snap = open_snapshot(Settings().model)
    assert snap.versions["model"] and snap.versions["store"] == ""
    request = BidRequest(id="r", imps=(Imp(id="1", banner_sizes=((300, 250),), has_banner=True),), channel="site",
                         domain="news.example", os="ios", devicetype=4, country="USA")
    score = snap.score(request, request.imps[0], 1_767_225_600.0)
    assert isinstance(score, Score) and not score.known_user
    assert 0.05 < score.value < 0.95
    assert Path(Settings().model).stat().st_size < 1_000_000
