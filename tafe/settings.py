"""One frozen, typed settings object for the whole process.

Values come from, in rising precedence: the defaults below, an optional TOML file
(``--config`` or ``TAFE_CONFIG``), environment variables ``TAFE_<FIELD>`` (upper
case), and command-line options. ``load()`` resolves them once at start-up; the
resulting ``Settings`` is then passed explicitly to whatever needs it (no globals).

Each field's metadata holds its description and its rule (range or choices): the one
source for ``--help``, for validation when a ``Settings`` is built, and for the README,
so the three never disagree.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent / "data"


def demo_curl(host: str, port: int) -> str:
    """A command that gets a bid from the TAFE at host:port, with the bundled demo request."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if host in ("0.0.0.0", "::"):
        where = f"127.0.0.1:{port}"
    return f"curl -s -H 'Content-Type: application/json' --data-binary @{DATA_DIR / 'demo-request.json'} http://{where}/openrtb2/bid"


def _opt(
    default: Any,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    choices: tuple[str, ...] = (),
    commands: tuple[str, ...] = ("serve", "up", "nginx"),
) -> Any:
    """A setting: its default, description, allowed values, and the commands that use it."""
    return field(
        default=default,
        metadata={"help": help, "low": low, "high": high, "choices": choices, "commands": commands},
    )


@dataclass(frozen=True, slots=True)
class Settings:
    # --- listening -------------------------------------------------------------
    host: str = _opt("127.0.0.1", "address the bid listener binds")
    port: int = _opt(8080, "bid listener port; 0 picks a free port (the start-up log line says which)", low=0, high=65535)
    admin_host: str = _opt("127.0.0.1", "address of the internal admin listener (/metrics, /debug/*)")
    admin_port: int = _opt(8081, "internal admin listener port; 0 picks a free port, -1 disables it", low=-1, high=65535)
    workers: int = _opt(0, "worker processes to pre-fork; 0 means one per CPU core, 1 serves in this process", low=0)
    cpu_affinity: bool = _opt(False, "pin worker i to CPU core i mod ncores")

    # --- HTTP limits -------------------------------------------------------------
    max_body_bytes: int = _opt(256 * 1024, "largest request body accepted on the wire (413 above)", low=1)
    max_inflated_bytes: int = _opt(1024 * 1024, "largest gzip-inflated request body (413 above: gzip-bomb guard)", low=1)
    max_header_bytes: int = _opt(16 * 1024, "largest request head (request line + headers; 431 above)", low=1)
    max_connections: int = _opt(10_000, "greenlet pool size: concurrent connections served per worker", low=1)
    keepalive_timeout_s: float = _opt(75.0, "idle keep-alive connection timeout; longer than Nginx's upstream keepalive_timeout", low=0)
    read_timeout_s: float = _opt(10.0, "time allowed to receive one whole request once it has started (slow-client guard)", low=0)
    send_batch_us: int = _opt(
        500, "longest a worker holds an answer (microseconds) so that answers made close together leave together: the"
        " client or Nginx is woken once for several instead of once for each; 0 sends every answer at once",
        low=0, high=5000, commands=("serve", "up"),
    )  # fmt: skip
    gzip_min_bytes: int = _opt(1024, "gzip responses at least this large when the client accepts gzip", low=0)

    # --- draining ------------------------------------------------------------------
    drain_grace_s: float = _opt(2.0, "after SIGTERM, /ping answers 503 this long before new connections are refused", low=0)
    drain_timeout_s: float = _opt(30.0, "after the grace, longest wait for in-flight requests before exiting", low=0)

    # --- bidding ---------------------------------------------------------------------
    campaigns: str = _opt(str(DATA_DIR / "campaigns.json"), "campaigns file (JSON); the bundled demo set by default", commands=("serve", "up", "nginx", "campaigns"))
    model: str = _opt(str(DATA_DIR / "model.cqsm"), "CQS model file; the bundled demo model by default")
    store: str = _opt("", "CQS user-state store file; empty: every user is unknown and scored from the request alone")
    watch_dir: str = _opt("", "directory watched for new model/store/shading files (*.cqsm, *.cqss, *.cqsb; atomically renamed in) to hot-swap")
    currency: str = _opt("USD", "the currency TAFE bids in", commands=("serve", "up", "nginx", "campaigns"))
    default_tmax_ms: int = _opt(100, "deadline used when a request carries no tmax", low=1)
    max_tmax_ms: int = _opt(1000, "cap on the deadline, whatever tmax says", low=1)
    network_margin_ms: int = _opt(10, "time kept back from tmax for the network round trip", low=0)
    min_budget_ms: int = _opt(5, "no-bid (nbr 15) when less than this remains of the budget at arrival", low=0)
    nbr_in_response: bool = _opt(False, "answer no-bids as 200 {id, nbr} instead of an empty 204")
    notice_base_url: str = _opt("", "base URL put in nurl/burl/lurl; empty: the scheme and Host header each bid request came in by")
    seat: str = _opt("tafe", "seat id in seatbid[].seat", commands=("serve", "up", "nginx", "campaigns"))
    exchanges: str = _opt(
        "", "exchange profiles file (JSON): per exchange of /openrtb2/bid/{exchange}, its seat, spend_on, price keys,"
        " notice_base_url, network_margin_ms and gzip; empty: every exchange gets the global settings",
        commands=("serve", "up", "exchanges"),
    )  # fmt: skip
    gvl_vendor_id: int = _opt(
        0, "TAFE's IAB Global Vendor List id, checked in TCF consent strings; 0 (not registered): where GDPR applies,"
        " contextual bids only", low=0, high=65535, commands=("serve", "up"),  # a TCF vendor id is 16 bits
    )  # fmt: skip

    # --- money -------------------------------------------------------------------------
    budget_period_s: int = _opt(
        86400, "length of a budget period (seconds); periods start at multiples of it since the Unix epoch (a day: UTC midnight)", low=1,
        commands=("serve", "up"),
    )  # fmt: skip
    spend_on: str = _opt(
        "bill", "which notice counts as spend: bill (the burl) or win (exchanges that bill on the nurl)", choices=("bill", "win"),
        commands=("serve", "up"),
    )  # fmt: skip
    reservation_ttl_s: int = _opt(
        300, "a bid's reserved budget is released if no billing, loss or win notice comes this long after the bid", low=1,
        commands=("serve", "up"),
    )  # fmt: skip
    notice_ttl_s: int = _opt(
        3600, "notices and tracking URLs are accepted this long after their bid, then refused as expired", low=1,
        commands=("serve", "up"),
    )  # fmt: skip
    # Secret: environment (TAFE_NOTICE_KEYS) or TOML only, never on a command line that any local user can read.
    notice_keys: str = _opt(
        "", "notice signing keys 'kid:secret[,kid:secret]' (the first signs, all verify); empty: notice_keys_file, else a"
        " random key per node", commands=(),
    )  # fmt: skip
    notice_keys_file: str = _opt(
        "", "file of notice signing keys ('kid:secret' pairs, one per line or comma-separated)", commands=("serve", "up")
    )
    state: str = _opt(
        "", "where the money state (spend, reservations, frequency counts) lives: a directory for the embedded state shared"
        " by one node's workers, or redis://HOST:PORT/DB for a Redis shared by a fleet; empty: a directory under the run"
        " directory (a temporary one unless run_dir is set)", commands=("serve", "up"),
    )  # fmt: skip
    event_log: str = _opt(
        "", "directory for event files (win, bill, loss, impression, click: JSON lines, rotated hourly, one file per"
        " worker); empty: no event files", commands=("serve", "up"),
    )  # fmt: skip

    # --- learning ---------------------------------------------------------------------
    decision_log: str = _opt("", "JSON-lines file of sampled bid decisions for training; empty disables it")
    decision_log_sample: float = _opt(0.01, "fraction of decisions written to the decision log", low=0, high=1)

    # --- profiler -----------------------------------------------------------------------
    block_threshold_ms: float = _opt(0.0, "report spans that hold the event loop longer than this; 0 disables the profiler", low=0)
    profile_sample: float = _opt(0.0, "fraction of requests whose spans are recorded in detail", low=0, high=1)

    # --- logging --------------------------------------------------------------------------
    log_level: str = _opt("info", "least severe log level written", choices=("debug", "info", "warning", "error"))
    log_json: bool = _opt(False, "write logs and access logs as JSON lines")
    access_log: bool = _opt(False, "log one line per request")

    # --- nginx (tafe up) ---------------------------------------------------------------------
    nginx: str = _opt("nginx", "the nginx binary used by 'tafe up' and 'tafe nginx run'", commands=("up", "nginx"))
    nginx_batch: bool = _opt(
        True,
        "run Nginx as a SCHED_BATCH task, so that its wake-ups never preempt a worker mid-bid: less CPU per proxied"
        " request where both share a core, for a few tenths of a ms more median latency (benchmarks/RESULTS.md, the Nginx hop);"
        " read when Nginx starts",
        commands=("up", "nginx"),
    )
    run_dir: str = _opt("", "directory for runtime files (pre-forked workers' metrics, nginx prefix); empty: a temporary one")

    def __post_init__(self) -> None:
        for name in FIELDS:
            problem = _problem(name, getattr(self, name))
            if problem:
                raise SettingsError(problem)

    def with_overrides(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


class SettingsError(ValueError):
    """A setting is wrong, or what it names (a file, a port) cannot be used at start-up.

    The message names the setting or the file, and where the value came from: ``tafe``
    prints it as one line and exits non-zero.
    """


def rule(name: str) -> str:
    """The values a setting accepts, in words (for --help, errors and the README)."""
    meta = FIELDS[name].metadata
    low, high, choices = meta["low"], meta["high"], meta["choices"]
    if choices:
        return "one of " + ", ".join(choices)
    if low is not None and high is not None:
        return f"{low}..{high}"
    if low is not None:
        return f">= {low}"
    return ""


def _problem(name: str, value: Any) -> str:
    """Why ``value`` is not allowed for setting ``name``, or "" if it is."""
    meta = FIELDS[name].metadata
    low, high, choices = meta["low"], meta["high"], meta["choices"]
    if choices:
        ok = value in choices
    else:  # written so that NaN fails too
        ok = (low is None or value >= low) and (high is None or value <= high)
    return "" if ok else f"{name} must be {rule(name)}, got {value!r}"


def _convert(kind: type, value: Any) -> Any:
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if kind is bool and isinstance(value, str):
        low = value.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(value)
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    return kind(value)


def _coerce(name: str, value: Any, source: str) -> Any:
    """``value`` as the setting's type, within its rule; the error names ``source``."""
    kind = type(FIELDS[name].default)
    try:
        value = _convert(kind, value)
    except (TypeError, ValueError, OverflowError):
        raise SettingsError(f"{source}: {name} must be {kind.__name__}, got {value!r}") from None
    problem = _problem(name, value)
    if problem:
        raise SettingsError(f"{source}: {problem}")
    return value


def load(
    config: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Resolve defaults < TOML file < TAFE_* environment < explicit overrides."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    config = config or environ.get("TAFE_CONFIG") or None
    if config:
        path = Path(config)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"config file {path}: {exc}") from None
        data = data.get("tafe", data)
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in FIELDS:
                raise SettingsError(f"config file {path}: unknown setting {key!r}")
            values[name] = _coerce(name, value, f"config file {path}")
    for name in FIELDS:
        env = "TAFE_" + name.upper()
        if env in environ:
            values[name] = _coerce(name, environ[env], f"environment {env}")
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _coerce(name, value, "command line")
    settings = Settings(**values)
    if settings.workers == 0:
        settings = settings.with_overrides(workers=os.cpu_count() or 1)
    return settings
