"""Customer Quality Score: how much a user is worth for an imp, known in microseconds.

A ``Snapshot`` pairs one model (``tafe.cqs.model``) with one user-state store
(``tafe.cqs.store``, or none: every user unknown), and carries the learned first-price
shading table (``tafe.core.shading``, or none: the fixed factor) that the same pipeline
round publishes. It is never changed once built; hot swap (``tafe.cqs.swap.Holder``)
replaces the whole snapshot between requests, so a request scores all its imps against
one consistent set.

``Snapshot.score`` is the bid path's only call: look the user up by the request's
keys (``BidRequest.user_keys``, in the project's preference order), extract features
(``tafe.cqs.features``), and return the primary head's probability. An unknown user
is not an error: it is scored on the request alone with its own indicator feature.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple


class CqsError(Exception):
    """A model or store file could not be used; the message names the file and the fault."""


class Score(NamedTuple):
    value: float  # 0..1: calibrated probability of the primary head
    known_user: bool


_new_score = tuple.__new__


# Imported after CqsError and Score, which the submodules import from here.
from tafe.cqs import features as _features  # noqa: E402
from tafe.cqs import model as _model  # noqa: E402
from tafe.cqs.state import UserState  # noqa: E402

if TYPE_CHECKING:
    from tafe.core.shading import Shading
    from tafe.core.types import BidRequest, Imp
    from tafe.cqs.store import UserStore


class Snapshot:
    """One model plus one store (or None) and a shading table (or None), immutable once built; safe to share.

    ``score`` memoizes the primary head's partial sums of the request context
    (inventory, device, geo, hour) and of the slot, bounded at ``MEMO_MAX`` entries
    each: popular publishers and sizes then cost a dict look-up instead of ~20 hashes.
    The memos only cache pure functions of the snapshot, so they never change a score.
    """

    MEMO_MAX = 4096
    __slots__ = ("model", "store", "shading", "versions", "_x", "_w", "_bias", "_w_unknown", "_as_of", "_last", "_ctx_memo", "_imp_memo")

    def __init__(self, model: _model.Model, store: UserStore | None = None, shading: Shading | None = None) -> None:
        self.model = model
        self.store = store
        self.shading = shading
        self.versions = {"model": model.version, "store": store.version if store is not None else ""}
        if shading is not None:
            self.versions["shading"] = shading.version
        self._x = _features.Extractor(model.dims)
        self._w = model.heads[0].weights
        self._bias = model.heads[0].bias
        self._w_unknown = self._w[self._x.t_known[0]]
        self._as_of = float(store.as_of) if store is not None else 0.0
        # (request, now, request-level sum, known, device code, inventory bytes) of the
        # last request scored: its other imps reuse them (one store lookup per request).
        # Replaced whole, never mutated, so interleaving greenlets or threads stay correct.
        self._last: tuple[BidRequest | None, float | None, float, bool, int, bytes] = (None, None, 0.0, False, 0, b"")
        self._ctx_memo: dict[tuple[object, ...], tuple[float, int, bytes, int]] = {}
        self._imp_memo: dict[tuple[object, ...], float] = {}

    def lookup(self, request: BidRequest) -> UserState | None:
        if self.store is None or not request.user_keys:
            return None
        return self.store.lookup(request.user_keys)

    def score(self, request: BidRequest, imp: Imp, now: float) -> Score:
        w = self._w
        last = self._last
        if last[0] is request and last[1] == now:
            _, _, z, known, dt, inv = last
        else:
            days, secs = divmod(int(now), 86400)
            hr, dow = secs // 3600, (days + 3) % 7
            key = (request.channel, request.domain, request.bundle, request.publisher_id, request.os, request.country,
                   request.region, request.inventory_cats, request.devicetype, request.lmt, request.dnt, request.gdpr, hr, dow)
            ctx = self._ctx_memo.get(key)
            if ctx is None:
                idx, dt, inv, chc = self._x.context(request, hr, dow)
                ctx = (sum([w[i] for i in idx]), dt, inv, chc)
                if len(self._ctx_memo) >= self.MEMO_MAX:
                    self._ctx_memo.clear()
                self._ctx_memo[key] = ctx
            z, dt, inv, chc = ctx
            state = self.lookup(request)
            known = state is not None
            if state is not None:
                z += sum([w[i] for i in self._x.user(state, dt, chc, hr, max(0, int((now - self._as_of) // 3600)))])
            else:
                z += self._w_unknown
            self._last = (request, now, z, known, dt, inv)
        imp_key = (imp.banner_sizes, imp.has_banner, imp.video is None, imp.audio is None, imp.native, imp.instl,
                   imp.rewarded, imp.bidfloor, imp.tagid, dt, inv)
        zi = self._imp_memo.get(imp_key)
        if zi is None:
            zi = sum([w[i] for i in self._x.imp_part(imp, dt, inv)])
            if len(self._imp_memo) >= self.MEMO_MAX:
                self._imp_memo.clear()
            self._imp_memo[imp_key] = zi
        return _new_score(Score, (_model.sigmoid(self._bias + z + zi), known))  # Score(...) without its Python __new__

    def features(self, request: BidRequest, imp: Imp, now: float) -> tuple[list[str], UserState | None]:
        """The feature strings of one imp and the user state behind them (decision log)."""
        state = self.lookup(request)
        return _features.names(request, imp, state, now, self._as_of), state

    def predict(self, request: BidRequest, imp: Imp, now: float) -> dict[str, float]:
        """Every head's probability (slow path, for logs and inspection)."""
        state = self.lookup(request)
        return self.model.predict(self._x.indices(request, imp, state, now, self._as_of))


def open_snapshot(model_path: str, store_path: str = "") -> Snapshot:
    """Load and validate a model (and a store); raises ``CqsError`` on any bad file."""
    model = _model.load(model_path)
    store = None
    if store_path:
        try:
            from tafe.cqs.store import open_store
        except ImportError as exc:  # pragma: no cover - until the store lands
            raise CqsError(f"CQS store {store_path}: store support unavailable ({exc})") from None
        store = open_store(store_path)
    return Snapshot(model, store)


def __getattr__(name: str) -> Any:
    # Imported lazily so importing tafe.cqs stays light (and free of cycles).
    if name == "Holder":
        from tafe.cqs.swap import Holder

        return Holder
    if name == "DecisionLog":
        from tafe.cqs.decision_log import DecisionLog

        return DecisionLog
    raise AttributeError(f"module 'tafe.cqs' has no attribute {name!r}")


__all__ = ["CqsError", "Score", "Snapshot", "open_snapshot", "Holder", "DecisionLog"]
