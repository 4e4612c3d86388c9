"""The thin WSGI layer over the bidding core: the only part of TAFE that knows HTTP routes.

``make_public_app`` serves exchanges (bids, notices, ``/ping``); ``make_admin_app``
serves operators (``/metrics``, ``/ping``, mounted debug apps) on another listener;
``build`` wires both from the settings. Any WSGI server can host the public app
(``tafe.wsgi:application``); TAFE's own gevent server passes ``tafe.arrival``, and calls
the bid route through ``PublicApp.handle``, without WSGI (``tafe.server``).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import orjson
from prometheus_client import CollectorRegistry

from tafe.core import campaigns as campaigns_mod
from tafe.core.campaigns import Campaigns
from tafe.cqs import open_snapshot
from tafe.cqs.decision_log import DecisionLog
from tafe.cqs.swap import Holder
from tafe.events import EventSink, NullSink, RotatingFiles
from tafe.exchanges import load as load_exchanges
from tafe.handlers.bid import BidHandler
from tafe.handlers.notices import KINDS, TRACKS, NoticeHandler, NoticeQueue
from tafe.lifecycle import Lifecycle
from tafe.metrics import Metrics, cooperative, exposition
from tafe.money import keys_of, node_settings, open_state
from tafe.money.banker import FLOAT_TRUST_S, Banker, period_of
from tafe.money.state import State
from tafe.settings import Settings, SettingsError

__all__ = ["Apps", "PublicApp", "build", "make_admin_app", "make_public_app"]

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
Headers = list[tuple[str, str]]
log = logging.getLogger("tafe")

_BID_PREFIX = "/openrtb2/bid"
_EXCHANGE = re.compile(r"[A-Za-z0-9_.-]{1,40}")
_MAX_EXCHANGES = 64  # bounds the exchange label's cardinality in /metrics
_TEXT: Headers = [("Content-Type", "text/plain; charset=utf-8")]


class Apps(NamedTuple):
    public: WSGIApp
    admin: WSGIApp
    holder: Holder  # .current: the active CQS snapshot
    metrics: Metrics
    campaigns: Campaigns
    money: Money


class Money(NamedTuple):
    """A worker's side of the money loop: what the shell syncs, drains, flushes and closes."""

    banker: Banker
    state: State
    events: EventSink
    settings: Settings
    queue: NoticeQueue  # notices the state could not take (Redis gone), applied by ``drain``

    def sync(self, metrics: Metrics, now: float, *, final: bool = False) -> None:
        """Report reservations and take new floats; publish the accounts as gauges."""
        failing = self.banker.failures > 0
        try:
            self.banker.sync(self.state, now, final=final)
        except Exception:
            metrics.money_errors.labels("reserve").inc()
            if not failing:  # said once per outage, not at every retry
                log.warning(
                    "money state sync failed; budgeted campaigns bid only from the floats they hold, for %.0f s",
                    FLOAT_TRUST_S, exc_info=True,
                )  # fmt: skip
            return
        if failing:
            log.info("money state reachable again")
        for cid, account in self.banker.accounts.items():
            metrics.campaign_budget.labels(cid).set(account.budget / 1e9)
            metrics.campaign_spend.labels(cid).set(account.spent / 1e9)
            metrics.campaign_reserved.labels(cid).set(account.reserved / 1e9)
            metrics.campaign_left.labels(cid).set(account.left / 1e9)
            metrics.campaign_pacing.labels(cid).set(account.rate / 1e9)

    def drain(self, metrics: Metrics) -> None:
        """Apply the notices kept while the state was gone, once it answers again."""
        if not self.queue.items:
            return
        try:
            n = self.queue.drain(self.state)
        except Exception:  # still gone: counted, said once already (NoticeHandler)
            metrics.money_errors.labels("notice_queue").inc()
            return
        log.info("money state back: %d kept notices applied", n)

    def close(self, metrics: Metrics) -> None:
        """Report what is queued and give the floats back, so other workers can use them at once."""
        self.drain(metrics)
        if self.queue.items:
            log.error("money state unreachable at exit: %d notices lost", len(self.queue.items))
        self.sync(metrics, time.time(), final=True)
        self.events.close()
        self.state.flush()


def _ping(lifecycle: Lifecycle) -> tuple[str, Headers, bytes]:
    if lifecycle.draining:
        return "503 Service Unavailable", _TEXT, b"draining\n"
    return "200 OK", _TEXT, b"pong\n"


def make_public_app(
    settings: Settings,
    *,
    lifecycle: Lifecycle,
    metrics: Metrics,
    holder: Holder,
    campaigns: Campaigns,
    money: Money | None = None,
    decision_log: DecisionLog | None = None,
) -> WSGIApp:
    """Bids on ``POST /openrtb2/bid[/{exchange}]``, notices on ``/notice/{win,bill,loss}``, tracking on
    ``/track/{imp,click}``, ``GET /ping``. Without ``money``, a fresh state of its own. Each exchange
    of the ``exchanges`` file gets its profile (``tafe.exchanges``); ``ExchangesError`` if it is bad."""
    if money is None:
        settings = node_settings(settings)
        money = open_money(settings, campaigns)
        money.sync(metrics, time.time())
    profiles = load_exchanges(settings)
    bid = BidHandler(
        settings, metrics=metrics, holder=holder, campaigns=campaigns, banker=money.banker, state=money.state,
        keys=keys_of(settings), exchanges=profiles, decision_log=decision_log,
    )  # fmt: skip
    notice = NoticeHandler(
        metrics=metrics, campaigns=campaigns, state=money.state, keys=keys_of(settings), events=money.events,
        notice_ttl_s=settings.notice_ttl_s, reservation_ttl_s=settings.reservation_ttl_s,
        period_s=settings.budget_period_s, exchanges=profiles, queue=money.queue,
    )  # fmt: skip
    exchanges = set(profiles.by_name)  # labelled in /metrics whatever the cap
    updates = metrics.updates
    latency = {r: updates.histogram(metrics.latency.labels(r)) for r in ("bid", "notice", "ping", "other")}
    counters: dict[tuple[str, str], Any] = {}
    in_flight = updates.gauge(metrics.in_flight)

    def exchange_of(path: str) -> str:
        name = path[len(_BID_PREFIX) + 1 :]
        if name in exchanges:
            return name
        if _EXCHANGE.fullmatch(name) and len(exchanges) < _MAX_EXCHANGES:
            exchanges.add(name)
            return name
        return "other"

    def route(environ: dict[str, Any], method: str, path: str) -> tuple[str, str, Headers, bytes]:
        if path == _BID_PREFIX or path.startswith(_BID_PREFIX + "/"):
            if method != "POST":
                return "bid", "405 Method Not Allowed", [*_TEXT, ("Allow", "POST")], b"POST only\n"
            exchange = exchange_of(path) if len(path) > len(_BID_PREFIX) + 1 else "default"
            return ("bid", *bid(environ, exchange))
        if path.startswith("/notice/") or path.startswith("/track/"):
            kind = path[8:] if path[1] == "n" else path[7:]
            if kind not in (KINDS if path[1] == "n" else TRACKS):
                return "notice", "404 Not Found", _TEXT, b"not found\n"
            if method not in ("GET", "POST", "HEAD"):
                return "notice", "405 Method Not Allowed", [*_TEXT, ("Allow", "GET, POST")], b"GET or POST\n"
            return ("notice", *notice(environ, kind))
        if path == "/ping":
            if method not in ("GET", "HEAD"):
                return "ping", "405 Method Not Allowed", [*_TEXT, ("Allow", "GET")], b"GET only\n"
            return ("ping", *_ping(lifecycle))
        return "other", "404 Not Found", _TEXT, b"not found\n"

    def answer(environ: dict[str, Any], method: str, path: str, start: float) -> tuple[str, Headers, bytes]:
        """Route, counting the request and its latency (``start``: its arrival)."""
        in_flight.inc()
        try:
            name, status, headers, body = route(environ, method, path)
        except Exception:  # a bug, never client input: answer 500, keep the worker
            log.exception("unhandled error on %s %s", method, path)
            name, status, headers, body = "other", "500 Internal Server Error", _TEXT, b"internal error\n"
            if path.startswith(_BID_PREFIX):
                name = "bid"
        finally:
            in_flight.dec()
        key = (name, status)
        counter = counters.get(key)
        if counter is None:
            counter = counters[key] = updates.counter(metrics.requests.labels(name, status[:3]))
        counter.inc()
        now = time.monotonic()
        latency[name].observe(now - start)
        if now >= updates.due:
            updates.fold()
        return status, headers, body

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start = environ.get("tafe.arrival") or time.monotonic()
        status, headers, body = answer(environ, environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", ""), start)
        if status[:3] != "204":  # a 204 has no body and must not say a length (RFC 9110 8.6)
            headers = [*headers, ("Content-Length", str(len(body)))]
        start_response(status, headers)
        return [body]

    def handle(method: str, path: str, environ: dict[str, Any]) -> tuple[str, Headers, bytes] | None:
        if path == _BID_PREFIX or path.startswith(_BID_PREFIX + "/"):
            return answer(environ, method, path, environ["tafe.arrival"])
        return None  # notices, tracking, /ping: the WSGI side, which reads their query strings

    return PublicApp(app, handle)


class PublicApp:
    """The public WSGI app, plus ``handle``: the bid route without WSGI, for TAFE's own
    server (``tafe.server``; its environ is ``tafe.http.direct_environ``'s). The answer
    is the same either way: the server frames it (Content-Length) instead of the app."""

    __slots__ = ("_wsgi", "handle")

    def __init__(self, wsgi: WSGIApp, handle: Callable[[str, str, dict[str, Any]], tuple[str, Headers, bytes] | None]) -> None:
        self._wsgi = wsgi
        self.handle = handle

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        return self._wsgi(environ, start_response)


def campaigns_report(money: Money, campaigns: Campaigns, now: float) -> dict[str, Any]:
    """``/debug/campaigns``: each campaign's budget, spend, reservations, pacing and capped users, read from the state."""
    period = period_of(now, money.settings.budget_period_s)
    accounts = money.state.accounts(period)
    out = []
    for c in campaigns.campaigns:
        a = accounts.get(c.id)
        entry: dict[str, Any] = {"id": c.id, "pacing": c.pacing if c.budget_micros else None}
        if c.budget_micros:
            entry.update(
                budget=c.budget_micros / 1e6,
                spent=a.spent / 1e9 if a else 0.0,
                reserved=a.reserved / 1e9 if a else 0.0,
                floated=a.floated / 1e9 if a else 0.0,
                left=a.left / 1e9 if a else c.budget_micros / 1e6,
                pacing_rate_per_s=a.rate / 1e9 if a else 0.0,
            )
        if c.frequency_cap is not None:
            entry["frequency_cap"] = {"impressions": c.frequency_cap.impressions, "window_s": c.frequency_cap.window_s}
        out.append(entry)
    caps = {c.id: c.frequency_cap.window_s for c in campaigns.campaigns if c.frequency_cap is not None}
    limits = {c.id: c.frequency_cap.impressions for c in campaigns.campaigns if c.frequency_cap is not None}
    capped = money.state.capped_users(limits, caps, now) if caps else {}
    for entry in out:
        if entry["id"] in capped:
            entry["capped_users"] = capped[entry["id"]]
    return {
        "currency": campaigns.currency, "period": period, "period_s": money.settings.budget_period_s,
        "period_start": period * money.settings.budget_period_s, "campaigns": out,
    }  # fmt: skip


def make_admin_app(
    settings: Settings,
    *,
    lifecycle: Lifecycle,
    metrics: Metrics,
    mounts: dict[str, WSGIApp] | None = None,
    money: Money | None = None,
    campaigns: Campaigns | None = None,
) -> WSGIApp:
    """``GET /metrics`` (Prometheus text), ``GET /ping``, ``GET /debug/campaigns``, and apps mounted by path prefix."""
    mounted = sorted((mounts or {}).items(), key=lambda kv: -len(kv[0]))  # longest prefix first
    registry = metrics.registry

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        for prefix, sub in mounted:
            if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                environ = dict(environ)
                environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + prefix.rstrip("/")
                environ["PATH_INFO"] = path[len(prefix.rstrip("/")) :]
                return sub(environ, start_response)
        method = environ.get("REQUEST_METHOD", "GET")
        if path in ("/metrics", "/ping") and method not in ("GET", "HEAD"):
            status, headers, body = "405 Method Not Allowed", [*_TEXT, ("Allow", "GET")], b"GET only\n"
        elif path == "/metrics":
            metrics.updates.fold()
            body, content_type = exposition(registry)  # all workers' values when pre-forked
            status, headers = "200 OK", [("Content-Type", content_type)]
        elif path == "/ping":
            status, headers, body = _ping(lifecycle)
        elif path == "/debug/campaigns" and money is not None and campaigns is not None:
            body = orjson.dumps(campaigns_report(money, campaigns, time.time()), option=orjson.OPT_INDENT_2) + b"\n"
            status, headers = "200 OK", [("Content-Type", "application/json")]
        else:
            status, headers, body = "404 Not Found", _TEXT, b"not found\n"
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return [body]

    return app


def _show_versions(metrics: Metrics, old: dict[str, str], new: dict[str, str]) -> None:
    """After a hot swap: the replaced versions read 0, the serving ones 1."""
    for kind, version in old.items():
        if new.get(kind) != version:
            metrics.model_info.labels(kind, version).set(0)
    for kind, version in new.items():
        metrics.model_info.labels(kind, version).set(1)


def _decision_log(settings: Settings, money: Money) -> DecisionLog | None:
    """Sampled decisions go to ``--decision-log`` and, with ``--event-log``, to the event sink."""
    events = money.events if settings.event_log else None
    if not settings.decision_log and events is None:
        return None
    try:
        return DecisionLog(settings.decision_log or None, settings.decision_log_sample, events=events)
    except OSError as exc:
        raise SettingsError(f"decision_log {settings.decision_log}: {exc.strerror or exc}") from None


def open_money(settings: Settings, campaigns: Campaigns) -> Money:
    """The worker's banker on the node's money state, synced once so that it bids at once."""
    state = open_state(settings)
    banker = Banker(
        campaigns.campaigns, worker=f"{socket.gethostname()}:{os.getpid()}", period_s=settings.budget_period_s,
        reservation_ttl_s=settings.reservation_ttl_s,
    )  # fmt: skip
    try:
        events: EventSink = RotatingFiles(settings.event_log) if settings.event_log else NullSink()
    except OSError as exc:
        raise SettingsError(f"event_log {settings.event_log}: {exc.strerror or exc}") from None
    return Money(banker, state, events, settings, NoticeQueue())


def build(settings: Settings, *, lifecycle: Lifecycle | None = None, registry: CollectorRegistry | None = None) -> Apps:
    """Load the campaigns and the CQS snapshot named by the settings and wire both apps."""
    lifecycle = lifecycle or Lifecycle()
    metrics = Metrics(registry if registry is not None else CollectorRegistry(), deferred=cooperative())
    campaigns = campaigns_mod.load(settings.campaigns, seat=settings.seat, currency=settings.currency)
    settings = node_settings(settings)  # a worker's master has filled these in already
    money = open_money(settings, campaigns)
    money.sync(metrics, time.time())
    holder = Holder(open_snapshot(settings.model, settings.store))
    for kind, version in holder.current.versions.items():
        metrics.model_info.labels(kind, version).set(1)
    holder.on_swap.append(lambda old, new: _show_versions(metrics, old.versions, new.versions))
    public = make_public_app(
        settings, lifecycle=lifecycle, metrics=metrics, holder=holder, campaigns=campaigns, money=money,
        decision_log=_decision_log(settings, money),
    )  # fmt: skip
    admin = make_admin_app(settings, lifecycle=lifecycle, metrics=metrics, money=money, campaigns=campaigns)
    return Apps(public=public, admin=admin, holder=holder, metrics=metrics, campaigns=campaigns, money=money)
