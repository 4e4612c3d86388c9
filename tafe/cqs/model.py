"""The CQS model file: a hashed-feature logistic model with one or more heads.

Format version 1 (all integers little-endian)::

    offset  size        field
    0       8           magic b"TAFECQSM"
    8       4           u32 format version (1)
    12      4           u32 H: length of the JSON header
    16      H           JSON header, UTF-8 (below)
    16+H    P           zero padding so the weights start on a 4-byte boundary
    ..      4*K*D       float32 weights, head-major: head 0's D weights, then head 1's...
    end-4   4           u32 CRC-32 of every byte before it

The JSON header holds ``version`` (the model version string, shown in /metrics and
bid responses), ``feature_spec`` (must be one this code extracts, see
``tafe.cqs.features``), ``hash`` ("crc32": a feature string's index is its CRC-32
masked to ``dims``), ``dims`` D (a power of two), ``heads`` (K objects with ``name``
and ``bias``; the first is the primary head whose probability is the CQS) and
free-form ``meta`` (training data, metrics). A file whose length, magic, version,
header or checksum is wrong is refused with a ``CqsError`` naming the file and the
fault, so a truncated or corrupt file never replaces a good model.

The primary head of the bundled demo model, ``visit``, is the probability that the
user visits the advertiser's site within a day of being shown the ad (the other
heads: ``click`` and ``purchase``). On the synthetic stream it learnt from, unknown
users score 0.08-0.78 (median 0.39) from the request alone, known users 0.04-0.93
(median 0.42); unknown users on the shared OpenRTB examples score 0.29-0.64.

In memory each head is an ``array('f')``: summing ~50 weights by index from it costs
about half what numpy fancy indexing does at this size (the index list must first
become an array), and the bid path then needs no numpy at all.

Regenerate the demo model (deterministic)::

    tafe cqs synth --out /tmp/cqs-demo --users 20000 --requests 200000 --seed 2
    tafe cqs train /tmp/cqs-demo/decisions.jsonl --out tafe/data/model.cqsm \\
        --dims 65536 --version demo-1 --seed 2
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import tempfile
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tafe.cqs import CqsError
from tafe.cqs.features import SPEC

MAGIC = b"TAFECQSM"
FORMAT_VERSION = 1
MAX_DIMS = 1 << 24
_PREFIX = struct.Struct("<8sII")


@dataclass(frozen=True)
class Head:
    name: str
    bias: float
    weights: array[float]  # array('f') of dims float32


@dataclass(frozen=True)
class Model:
    version: str
    dims: int
    heads: tuple[Head, ...]
    feature_spec: str = SPEC
    meta: dict[str, Any] = field(default_factory=dict)

    def logit(self, indices: Sequence[int], head: int = 0) -> float:
        h = self.heads[head]
        w = h.weights
        return h.bias + sum([w[i] for i in indices])

    def predict(self, indices: Sequence[int]) -> dict[str, float]:
        """Probability of every head (slow path: decision log, evaluation)."""
        return {h.name: sigmoid(self.logit(indices, k)) for k, h in enumerate(self.heads)}

    def to_bytes(self) -> bytes:
        header = json.dumps(
            {
                "version": self.version,
                "feature_spec": self.feature_spec,
                "hash": "crc32",
                "dims": self.dims,
                "heads": [{"name": h.name, "bias": h.bias} for h in self.heads],
                "meta": self.meta,
            },
            sort_keys=True,
        ).encode()
        pad = b"\0" * (-(_PREFIX.size + len(header)) % 4)
        parts = [_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)), header, pad]
        for h in self.heads:
            w = h.weights
            if sys.byteorder != "little":  # pragma: no cover
                w = array("f", w)
                w.byteswap()
            parts.append(w.tobytes())
        body = b"".join(parts)
        return body + struct.pack("<I", zlib.crc32(body))

    def save(self, path: str) -> None:
        """Write atomically (temp file + rename) so a watcher never sees half a model."""
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".cqsm", dir=directory)
        try:
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(self.to_bytes())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def from_bytes(data: bytes, source: str = "<bytes>") -> Model:
    def bad(why: str) -> CqsError:
        return CqsError(f"CQS model {source}: {why}; refused")

    if len(data) < _PREFIX.size + 4:
        raise bad(f"only {len(data)} bytes, too short to be a model file (truncated?)")
    magic, fmt, hlen = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise bad(f"not a CQS model (magic {magic!r}, expected {MAGIC!r})")
    if fmt != FORMAT_VERSION:
        raise bad(f"format version {fmt} is not supported (this TAFE reads version {FORMAT_VERSION})")
    if _PREFIX.size + hlen + 4 > len(data):
        raise bad(f"header length {hlen} runs past the end of the file (truncated?)")
    try:
        header = json.loads(data[_PREFIX.size : _PREFIX.size + hlen])
        version = header["version"]
        dims = header["dims"]
        heads_spec = header["heads"]
        spec = header["feature_spec"]
        names = [h["name"] for h in heads_spec]
        biases = [float(h["bias"]) for h in heads_spec]
    except (ValueError, KeyError, TypeError) as exc:
        raise bad(f"unreadable header ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(version, str) or not version:
        raise bad("header has no version string")
    if not isinstance(dims, int) or dims <= 0 or dims & (dims - 1) or dims > MAX_DIMS:
        raise bad(f"dims {dims!r} is not a power of two up to {MAX_DIMS}")
    if not names or len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
        raise bad("heads must be a non-empty list of uniquely named heads")
    if spec != SPEC:
        raise bad(f"feature spec {spec!r} is not the one this TAFE extracts ({SPEC!r})")
    if header.get("hash", "crc32") != "crc32":
        raise bad(f"hash {header.get('hash')!r} is not supported")
    start = _PREFIX.size + hlen + (-(_PREFIX.size + hlen) % 4)
    expected = start + 4 * dims * len(names) + 4
    if len(data) != expected:
        raise bad(f"{len(data)} bytes, expected {expected} for {len(names)} heads of {dims} weights (truncated or padded)")
    (crc,) = struct.unpack_from("<I", data, len(data) - 4)
    if zlib.crc32(memoryview(data)[:-4]) != crc:
        raise bad("checksum mismatch (corrupt file)")
    heads = []
    for k, (name, bias) in enumerate(zip(names, biases)):
        w = array("f")
        w.frombytes(data[start + 4 * dims * k : start + 4 * dims * (k + 1)])
        if sys.byteorder != "little":  # pragma: no cover
            w.byteswap()
        if not math.isfinite(sum(w)) or not math.isfinite(bias):
            raise bad(f"head {name!r} has non-finite weights")
        heads.append(Head(name, bias, w))
    meta = header.get("meta") if isinstance(header.get("meta"), dict) else {}
    return Model(version=version, dims=dims, heads=tuple(heads), feature_spec=spec, meta=meta)


def load(path: str) -> Model:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise CqsError(f"CQS model {path}: cannot read ({exc.strerror or exc})") from None
    return from_bytes(data, path)


def constant(version: str, biases: dict[str, float], dims: int = 1024) -> Model:
    """A model that ignores features: each head predicts sigmoid(bias)."""
    return Model(version, dims, tuple(Head(n, b, array("f", bytes(4 * dims))) for n, b in biases.items()))


def describe(model: Model, top: int = 10, names: dict[int, list[str]] | None = None) -> str:
    """Human-readable summary for ``tafe cqs inspect``: header, sizes, largest weights.

    The file keeps only hashed indices; ``names`` (index -> feature strings seen in
    some decision log) puts words on them.
    """
    lines = [
        f"version       {model.version}",
        f"feature spec  {model.feature_spec}",
        f"dims          {model.dims}",
        f"heads         {', '.join(h.name for h in model.heads)} (primary: {model.heads[0].name})",
    ]
    for h in model.heads:
        nonzero = sum(1 for x in h.weights if x)
        lines.append(f"head {h.name}: bias {h.bias:+.4f} (p {sigmoid(h.bias):.4f}), {nonzero} non-zero weights")
        ranked = sorted(range(model.dims), key=lambda i: -abs(h.weights[i]))[:top] if top > 0 else []
        lines += [f"    [{i:>8}] {h.weights[i]:+.4f}  {' | '.join((names or {}).get(i, []))}".rstrip()
                  for i in ranked if h.weights[i]]
    if model.meta:
        lines.append("meta          " + json.dumps(model.meta, sort_keys=True))
    return "\n".join(lines)
