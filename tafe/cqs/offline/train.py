"""Fit and judge CQS models from decision logs (``tafe cqs train`` / ``tafe cqs evaluate``).

Input: JSON lines, one per imp, as ``tafe.cqs.decision_log`` writes them once outcomes
are joined (and as ``tafe cqs synth`` writes them): ``features`` (feature strings),
``outcomes`` (head name -> 0/1; a head missing from a record that has ``outcomes``
counts as 0), optionally ``p_true`` (synthetic data: the hidden model's
probabilities, reported beside the model's own). Records without ``outcomes`` (never
joined) are skipped and counted.

The held-out split is a function of ``request_id``/``imp_id`` alone (CRC-32), so
``train`` and ``evaluate`` agree on it without sharing state. Training is logistic
regression on hashed features, every head at once, by mini-batch Adagrad with L2 in
numpy: deterministic for a seed, a few seconds per 100k records.
"""

from __future__ import annotations

import math
import time
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import orjson

from tafe.cqs import CqsError
from tafe.cqs.features import SPEC
from tafe.cqs.model import Head, Model


@dataclass
class Data:
    """Hashed records in CSR form: row r's indices are ``indices[indptr[r]:indptr[r+1]]``."""

    indices: np.ndarray  # int32
    indptr: np.ndarray  # int64, rows + 1
    labels: dict[str, np.ndarray]  # head -> float64 0/1
    p_true: dict[str, np.ndarray]  # head -> probabilities, when the logs carry them
    heldout: np.ndarray  # bool: in the evaluation split
    skipped: int
    known: np.ndarray  # bool: the store knew the user

    @property
    def rows(self) -> int:
        return len(self.indptr) - 1

    def subset(self, mask: np.ndarray) -> Data:
        rows = np.flatnonzero(mask)
        take, lengths = _gather(self.indptr, rows)
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        return Data(self.indices[take], indptr, {h: v[rows] for h, v in self.labels.items()},
                    {h: v[rows] for h, v in self.p_true.items()}, self.heldout[rows], 0, self.known[rows])


def _gather(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions in a CSR ``indices`` of the given rows, in order, and their lengths."""
    lens = indptr[rows + 1] - indptr[rows]
    starts = np.cumsum(lens) - lens
    return np.repeat(indptr[rows] - starts, lens) + np.arange(int(lens.sum())), lens


def is_heldout(request_id: str, imp_id: str, fraction: float) -> bool:
    return zlib.crc32(f"{request_id}/{imp_id}".encode()) % 10_000 < fraction * 10_000


def _open_log(path: str) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as exc:
        raise CqsError(f"decision log {path}: cannot read ({exc.strerror or exc})") from None


def read(paths: Sequence[str], dims: int, heads: Sequence[str], holdout: float) -> Data:
    """Read decision logs, hashing every feature string into ``dims`` (a power of two)."""
    mask = dims - 1
    cache: dict[str, int] = {}
    # compact arrays, not lists of Python ints: millions of records stay in memory
    indices = array("i")
    indptr = array("q", [0])
    labels = {h: bytearray() for h in heads}
    p_true = {h: array("d") for h in heads}
    has_truth = True
    heldout = bytearray()
    known = bytearray()
    skipped = 0
    for path in paths:
        with _open_log(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = orjson.loads(line)
                    feats = rec["features"]
                    outcomes = rec.get("outcomes")
                except (ValueError, KeyError, TypeError):
                    raise CqsError(f"decision log {path}:{lineno}: not a decision record") from None
                if not isinstance(outcomes, dict) or not isinstance(feats, list):
                    skipped += 1
                    continue
                for name in feats:
                    i = cache.get(name)
                    if i is None:
                        i = cache[name] = zlib.crc32(str(name).encode()) & mask
                    indices.append(i)
                indptr.append(len(indices))
                for h in heads:
                    labels[h].append(1 if outcomes.get(h) else 0)
                truth = rec.get("p_true")
                if has_truth and isinstance(truth, dict) and all(h in truth for h in heads):
                    for h in heads:
                        p_true[h].append(float(truth[h]))
                else:
                    has_truth = False
                flag = rec.get("known")
                known.append(flag if isinstance(flag, bool) else "known=1" in feats)
                heldout.append(is_heldout(str(rec.get("request_id", lineno)), str(rec.get("imp_id", "")), holdout))
    return Data(
        np.frombuffer(indices, dtype=np.int32).copy(), np.frombuffer(indptr, dtype=np.int64).copy(),
        {h: np.frombuffer(v, dtype=np.uint8).astype(np.float64) for h, v in labels.items()},
        {h: np.frombuffer(v, dtype=np.float64).copy() for h, v in p_true.items()} if has_truth else {},
        np.frombuffer(heldout, dtype=np.uint8).astype(bool), skipped, np.frombuffer(known, dtype=np.uint8).astype(bool),
    )


def feature_names(paths: Sequence[str], dims: int, limit: int = 100_000) -> dict[int, list[str]]:
    """Index -> the distinct feature strings hashed there, from the first ``limit`` records."""
    out: dict[int, list[str]] = {}
    seen: set[str] = set()
    n = 0
    for path in paths:
        with _open_log(path) as f:
            for line in f:
                if n >= limit:
                    return out
                try:
                    feats = orjson.loads(line).get("features") or []
                except (ValueError, AttributeError):
                    continue
                n += 1
                for name in feats:
                    if name not in seen:
                        seen.add(name)
                        out.setdefault(zlib.crc32(str(name).encode()) & (dims - 1), []).append(name)
    return out


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # stable for any z


def fit(data: Data, dims: int, heads: Sequence[str], epochs: int = 3, l2: float = 1e-3, lr: float = 0.05,
        batch: int = 256, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Adagrad on the logistic loss of every head; returns (weights[H, D], biases[H])."""
    n = data.rows
    if n == 0:
        raise CqsError("no training records (every record lacked outcomes, or the logs are empty)")
    H = len(heads)
    w = np.zeros((H, dims))
    b = np.zeros(H)
    G = np.full((H, dims), 1e-8)
    Gb = np.full(H, 1e-8)
    # start each bias at the base rate: faster and better-calibrated early steps
    for k, h in enumerate(heads):
        rate = float(np.clip(data.labels[h].mean(), 1e-6, 1 - 1e-6))
        b[k] = math.log(rate / (1 - rate))
    Y = np.stack([data.labels[h] for h in heads])  # H x n
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n, batch):
            rows = order[start : start + batch]
            take, lens = _gather(data.indptr, rows)
            idx = data.indices[take]
            row_of = np.repeat(np.arange(len(rows)), lens)
            uniq, inv = np.unique(idx, return_inverse=True)
            for k in range(H):
                wk = w[k]
                z = b[k] + np.bincount(row_of, weights=wk[idx], minlength=len(rows))
                g = _sigmoid(z) - Y[k, rows]
                gw = np.bincount(inv, weights=g[row_of], minlength=len(uniq)) + l2 * len(rows) * wk[uniq]
                G[k, uniq] += gw * gw
                wk[uniq] -= lr * gw / np.sqrt(G[k, uniq])
                gb = g.sum()
                Gb[k] += gb * gb
                b[k] -= lr * gb / math.sqrt(Gb[k])
    return w, b


def predict(weights: np.ndarray, bias: float, data: Data) -> np.ndarray:
    row_of = np.repeat(np.arange(data.rows), np.diff(data.indptr))
    return _sigmoid(bias + np.bincount(row_of, weights=weights[data.indices], minlength=data.rows))


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve by ranks (ties share their average rank)."""
    pos = float(labels.sum())
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    _, first, counts = np.unique(s, return_index=True, return_counts=True)
    avg_rank = first + (counts + 1) / 2.0  # 1-based average rank of each tie group
    ranks = np.empty(len(s))
    ranks[order] = np.repeat(avg_rank, counts)
    return float((ranks[labels > 0].sum() - pos * (pos + 1) / 2) / (pos * neg))


def log_loss(p: np.ndarray, labels: np.ndarray) -> float:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def calibration(p: np.ndarray, labels: np.ndarray, bins: int = 10) -> list[dict[str, Any]]:
    """Reliability table over equal-count bins of the prediction (rare heads stay readable)."""
    order = np.argsort(p, kind="mergesort")
    out = []
    for chunk in np.array_split(order, bins):
        if len(chunk):
            out.append({"n": int(len(chunk)), "p_lo": float(p[chunk].min()), "p_hi": float(p[chunk].max()),
                        "predicted": float(p[chunk].mean()), "observed": float(labels[chunk].mean())})
    return out


def metrics(p: np.ndarray, labels: np.ndarray, bins: int = 10) -> dict[str, Any]:
    table = calibration(p, labels, bins)
    ece = sum(r["n"] * abs(r["predicted"] - r["observed"]) for r in table) / max(1, len(p))
    return {"auc": auc(p, labels), "log_loss": log_loss(p, labels), "mean_predicted": float(p.mean()),
            "observed_rate": float(labels.mean()), "ece": float(ece), "calibration": table}


def evaluate(model: Model, data: Data, bins: int = 10) -> dict[str, Any]:
    """Per head: the model's AUC, log loss, calibration; the hidden model's when known."""
    report: dict[str, Any] = {"records": data.rows, "skipped": data.skipped, "model": model.version, "heads": {}}
    for h in model.heads:
        if h.name not in data.labels:
            continue
        p = predict(np.frombuffer(h.weights, dtype=np.float32).astype(np.float64), h.bias, data)
        m = metrics(p, data.labels[h.name], bins)
        for seg, mask in (("known", data.known), ("unknown", ~data.known)):
            m[f"{seg}_users"] = int(mask.sum())
            m[f"{seg}_auc"] = auc(p[mask], data.labels[h.name][mask]) if mask.any() else float("nan")
        if h.name in data.p_true:
            truth = data.p_true[h.name]
            m["truth_auc"] = auc(truth, data.labels[h.name])
            m["truth_log_loss"] = log_loss(truth, data.labels[h.name])
        report["heads"][h.name] = m
    return report


def train_files(paths: Sequence[str], dims: int = 1 << 18, heads: Sequence[str] = ("visit", "click", "purchase"),
                version: str = "", epochs: int = 3, l2: float = 1e-3, holdout: float = 0.2, seed: int = 1) -> tuple[Model, dict[str, Any]]:
    """Read logs, fit on the training split, score the held-out split; (model, report)."""
    if dims <= 0 or dims & (dims - 1):
        raise CqsError(f"--dims must be a power of two, got {dims}")
    if not heads:
        raise CqsError("at least one head is needed")
    t0 = time.monotonic()
    data = read(paths, dims, heads, holdout)
    train_part = data.subset(~data.heldout) if holdout > 0 else data
    w, b = fit(train_part, dims, heads, epochs=epochs, l2=l2, seed=seed)
    version = version or "cqs-%s-%08x" % (time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()), zlib.crc32(data.indices.tobytes()))
    meta = {"trained_on": train_part.rows, "heldout": int(data.heldout.sum()), "epochs": epochs, "l2": l2, "seed": seed,
            "base_rates": {h: round(float(data.labels[h].mean()), 6) for h in heads}}
    model = Model(version, dims, tuple(Head(h, float(b[k]), _f32(w[k])) for k, h in enumerate(heads)), SPEC, meta)
    report: dict[str, Any] = {"records": data.rows, "skipped": data.skipped, "seconds": round(time.monotonic() - t0, 2)}
    if holdout > 0 and data.heldout.any():
        ev = evaluate(model, data.subset(data.heldout))
        report["heldout"] = {h: {k: v for k, v in m.items() if k != "calibration"} for h, m in ev["heads"].items()}
    return model, report


def _f32(x: np.ndarray) -> array[float]:
    out = array("f")
    out.frombytes(x.astype("<f4").tobytes())
    return out


def evaluate_files(model: Model, paths: Sequence[str], holdout: float | None = 0.2, bins: int = 10) -> dict[str, Any]:
    data = read(paths, model.dims, [h.name for h in model.heads], holdout or 0.0)
    if holdout is not None:
        data = data.subset(data.heldout)
    if data.rows == 0:
        raise CqsError("no records to evaluate (empty logs, or an empty held-out split)")
    return evaluate(model, data, bins)


def format_report(report: dict[str, Any]) -> str:
    lines = [f"model {report['model']}: {report['records']} records ({report['skipped']} without outcomes skipped)"]
    for name, m in report["heads"].items():
        truth = f"   hidden model: AUC {m['truth_auc']:.4f}, log loss {m['truth_log_loss']:.4f}" if "truth_auc" in m else ""
        lines.append(f"\nhead {name}: AUC {m['auc']:.4f}  log loss {m['log_loss']:.4f}  ECE {m['ece']:.4f}"
                     f"  rate {m['observed_rate']:.4f} (predicted {m['mean_predicted']:.4f}){truth}")
        lines.append(f"  known users: AUC {m['known_auc']:.4f} ({m['known_users']}); unknown users: AUC {m['unknown_auc']:.4f} ({m['unknown_users']})")
        lines.append(f"  {'bin':>3} {'n':>8} {'p range':>17} {'predicted':>10} {'observed':>10}")
        for i, r in enumerate(m["calibration"]):
            lines.append(f"  {i:>3} {r['n']:>8} {r['p_lo']:>8.4f}-{r['p_hi']:<8.4f} {r['predicted']:>10.4f} {r['observed']:>10.4f}")
    return "\n".join(lines)

