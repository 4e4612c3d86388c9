"""``tafe serve``: serve bids in the foreground, in this process or pre-forked.

With ``--workers 1`` this process is the worker: it builds the WSGI apps from the
settings, binds the public and admin listeners and runs the gevent shell until a
signal drains it. With more workers it hands over to the pre-fork master, whose
workers come back here through ``serve_in_process`` with inherited sockets.
Monkey-patching has already happened in ``tafe.cli.main``.
"""

from __future__ import annotations

import argparse
import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from tafe import logs
from tafe.cli import add_settings_options, settings_from_args
from tafe.core import load_campaigns
from tafe.exchanges import load as load_exchanges
from tafe.lifecycle import Lifecycle
from tafe.listeners import bind
from tafe.metrics import Deferred, Immediate
from tafe.settings import Settings, SettingsError, demo_curl

if TYPE_CHECKING:
    from tafe.server import Server

log = logging.getLogger("tafe")


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.epilog = "Send SIGTERM (or Ctrl-C) to drain: /ping turns 503, then in-flight requests finish and TAFE exits 0."
    add_settings_options(parser, command)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    logs.configure(settings)
    if settings.workers > 1:
        from tafe import master

        # Refused here in one line, not by every forked worker with a traceback.
        load_campaigns(settings.campaigns, seat=settings.seat, currency=settings.currency)
        load_exchanges(settings)
        return master.run(settings)
    return serve_in_process(settings)


def serve_in_process(
    settings: Settings,
    listener: socket.socket | None = None,
    admin_listener: socket.socket | None = None,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Build the apps, listen, serve until drained; returns the exit code."""
    from prometheus_client import CollectorRegistry

    from tafe import server
    from tafe.core.campaigns import CampaignsError
    from tafe.cqs import CqsError
    from tafe.handlers import build, make_admin_app

    # Listen first: a taken port is reported before a large store is loaded.
    public_sock = listener or bind(settings.host, settings.port)
    admin_sock = admin_listener
    if admin_sock is None and settings.admin_port >= 0:
        admin_sock = bind(settings.admin_host, settings.admin_port)
    lifecycle = Lifecycle()
    try:
        apps = build(settings, lifecycle=lifecycle, registry=CollectorRegistry())
    except (CampaignsError, CqsError) as exc:  # each names its file
        raise SettingsError(str(exc)) from None
    public, admin = apps.public, apps.admin
    prof = None
    if settings.block_threshold_ms > 0:
        from tafe import profiler

        prof = profiler.install(
            threshold_ms=settings.block_threshold_ms, sample=settings.profile_sample, registry=apps.metrics.registry
        )
        if prof.sample > 0:  # sampling needs the middleware; threshold-only does not
            public = profiler.middleware(public, prof)
        admin = make_admin_app(
            settings, lifecycle=lifecycle, metrics=apps.metrics, mounts={"/debug/blocking": profiler.debug_app(prof)}
        )
    # Always on: SIGHUP (or a file renamed onto the configured path, or into
    # watch_dir) reloads the model and store; one stat per second otherwise.
    from tafe.cqs import swap

    swap.watch(apps.holder, settings, logging.getLogger("tafe.cqs"))
    _fold_while_idle(apps.metrics.updates)
    _keep_money(apps)

    # Threshold-only: TAFE's server attributes spans to requests itself (no middleware).
    attribute = prof if prof is not None and prof.sample == 0 else None
    servers = [server.Server(public_sock, public, settings, lifecycle, metrics=apps.metrics, profiler=attribute)]
    if admin_sock is not None:
        servers.append(server.Server(admin_sock, admin, settings, lifecycle, name="admin"))

    def started() -> None:
        # A pre-forked worker (inherited listener) leaves the curl hint to its master.
        _announce(servers, apps, curl=listener is None)
        if listener is None:  # a pre-forked worker's master says it once for the node
            from tafe.money import warn_if_random_key

            warn_if_random_key(apps.money.settings)
        if on_ready is not None:
            on_ready()

    try:
        return server.run(servers, settings, lifecycle, on_started=started)
    finally:
        # Reservations still queued reach the state, floats go back to the other workers.
        apps.money.close(apps.metrics)
        # The last second's counts, before the master archives a retired worker's files.
        apps.metrics.updates.fold()
        if prof is not None:
            prof.fold_metrics()


def _fold_while_idle(updates: Immediate | Deferred) -> None:
    """Requests fold the deferred metric updates themselves; an idle worker's last counts
    would otherwise wait for the next request (a pre-forked node's scrape reads every
    worker's files but folds only its own)."""
    import gevent

    if not isinstance(updates, Deferred):
        return

    def fold_forever() -> None:
        while True:
            gevent.sleep(updates.period_s)
            if time.monotonic() >= updates.due:
                updates.fold()

    gevent.spawn(fold_forever)


SYNC_S = 1.0  # floats are renewed this often (the state's lease lasts 5 s)
SHORT_SYNC_S = 0.05  # at most this often when a float ran short


def _keep_money(apps: object) -> None:
    """The worker's money loop: sync floats every second (sooner when one ran short), apply
    the notices kept while the state was gone, write the buffered events and sync the state
    to disk off the event loop."""
    import gevent

    money, metrics = apps.money, apps.metrics  # type: ignore[attr-defined]
    pool = gevent.get_hub().threadpool

    def persist(events: bytes) -> None:  # in a thread: both may wait on the disk
        money.events.write(events)
        money.state.flush()

    def loop() -> None:
        last = time.monotonic()
        while True:
            gevent.sleep(SHORT_SYNC_S)
            due = time.monotonic() - last >= SYNC_S
            try:
                if money.banker.short or (due and money.banker.budgeted):
                    money.sync(metrics, time.time())
                if due:
                    last = time.monotonic()
                    money.drain(metrics)  # notices kept while the state was gone
                    pool.spawn(persist, money.events.take()).get()
            except Exception:  # a bug or a full disk: say so, keep the loop (floats depend on it)
                metrics.money_errors.labels("loop").inc()
                log.exception("money loop")

    gevent.spawn(loop)


def _announce(servers: list[Server], apps: object, curl: bool = True) -> None:
    host, port = servers[0].address
    versions = getattr(getattr(apps, "holder", None), "current", None)
    # The curl comes first: whoever waits for "listening on" then has both lines.
    (log.info if curl else log.debug)("try: %s", demo_curl(host, port))
    log.info(
        "listening on %s%s",
        servers[0].url,
        "".join(f" ({s.name} {s.url})" for s in servers[1:]),
        extra={"fields": dict(getattr(versions, "versions", {}))},  # model=..., store=... as their own keys
    )
