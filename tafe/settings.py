"""One frozen, typed settings object for the whole process.

Values come from, in rising precedence: the defaults below, an optional TOML file
(``--config`` or ``TAFE_CONFIG``), environment variables ``TAFE_<FIELD>`` (upper
case), and command-line options. ``load()`` resolves them once at start-up; the
resulting ``Settings`` is then passed explicitly to whatever needs it (no globals).

Each field's ``help`` metadata is the single description used by ``--help`` and by
the README, so the three never disagree.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

DATA_DIR = Path(__file__).resolve().parent / "data"


def demo_curl(host: str, port: int) -> str:
    """A command that gets a bid from the TAFE at host:port, with the bundled demo request."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if host in ("0.0.0.0", "::"):
        where = f"127.0.0.1:{port}"
    return f"curl -s -H 'Content-Type: application/json' --data-binary @{DATA_DIR / 'demo-request.json'} http://{where}/openrtb2/bid"


def _opt(default: Any, help: str, cli: bool = True) -> Any:
    return field(default=default, metadata={"help": help, "cli": cli})


@dataclass(frozen=True, slots=True)
class Settings:
    # --- listening -------------------------------------------------------------
    host: str = _opt("127.0.0.1", "address the bid listener binds")
    port: int = _opt(8080, "bid listener port; 0 picks a free port (the start-up log line says which)")
    admin_host: str = _opt("127.0.0.1", "address of the internal admin listener (/metrics, /debug/*)")
    admin_port: int = _opt(8081, "internal admin listener port; 0 picks a free port, -1 disables it")
    workers: int = _opt(0, "worker processes to pre-fork; 0 means one per CPU core, 1 serves in this process")
    cpu_affinity: bool = _opt(False, "pin worker i to CPU core i mod ncores")

    # --- HTTP limits -------------------------------------------------------------
    max_body_bytes: int = _opt(256 * 1024, "largest request body accepted on the wire (413 above)")
    max_inflated_bytes: int = _opt(1024 * 1024, "largest gzip-inflated request body (413 above: gzip-bomb guard)")
    max_header_bytes: int = _opt(16 * 1024, "largest request head (request line + headers; 431 above)")
    max_connections: int = _opt(10_000, "greenlet pool size: concurrent connections served per worker")
    keepalive_timeout_s: float = _opt(75.0, "idle keep-alive connection timeout; longer than Nginx's upstream keepalive_timeout")
    read_timeout_s: float = _opt(10.0, "time allowed to receive one whole request once it has started (slow-client guard)")
    gzip_min_bytes: int = _opt(1024, "gzip responses at least this large when the client accepts gzip")

    # --- draining ------------------------------------------------------------------
    drain_grace_s: float = _opt(2.0, "after SIGTERM, /ping answers 503 this long before new connections are refused")
    drain_timeout_s: float = _opt(30.0, "after the grace, longest wait for in-flight requests before exiting")

    # --- bidding ---------------------------------------------------------------------
    campaigns: str = _opt(str(DATA_DIR / "campaigns.json"), "campaigns file (JSON); the bundled demo set by default")
    model: str = _opt(str(DATA_DIR / "model.cqsm"), "CQS model file; the bundled demo model by default")
    store: str = _opt("", "CQS user-state store file; empty: every user is unknown and scored from the request alone")
    watch_dir: str = _opt("", "directory watched for new model/store files (atomically renamed in) to hot-swap")
    currency: str = _opt("USD", "the currency TAFE bids in")
    default_tmax_ms: int = _opt(100, "deadline used when a request carries no tmax")
    max_tmax_ms: int = _opt(1000, "cap on the deadline, whatever tmax says")
    network_margin_ms: int = _opt(10, "time kept back from tmax for the network round trip")
    min_budget_ms: int = _opt(5, "no-bid (nbr 15) when less than this remains of the budget at arrival")
    nbr_in_response: bool = _opt(False, "answer no-bids as 200 {id, nbr} instead of an empty 204")
    notice_base_url: str = _opt("", "base URL put in nurl/burl/lurl; empty: the scheme and Host header each bid request came in by")
    seat: str = _opt("tafe", "seat id in seatbid[].seat")
    gvl_vendor_id: int = _opt(0, "TAFE's IAB Global Vendor List id, checked in TCF consent strings; 0 (not registered): no bids where GDPR applies")

    # --- learning ---------------------------------------------------------------------
    decision_log: str = _opt("", "JSON-lines file of sampled bid decisions for training; empty disables it")
    decision_log_sample: float = _opt(0.01, "fraction of decisions written to the decision log")

    # --- profiler -----------------------------------------------------------------------
    block_threshold_ms: float = _opt(0.0, "report spans that hold the event loop longer than this; 0 disables the profiler")
    profile_sample: float = _opt(0.0, "fraction (0-1) of requests whose spans are recorded in detail")

    # --- logging --------------------------------------------------------------------------
    log_level: str = _opt("info", "debug, info, warning or error")
    log_json: bool = _opt(False, "write logs and access logs as JSON lines")
    access_log: bool = _opt(False, "log one line per request")

    # --- nginx (tafe up) ---------------------------------------------------------------------
    nginx: str = _opt("nginx", "the nginx binary used by 'tafe up' and 'tafe nginx run'")
    run_dir: str = _opt("", "directory for runtime files (nginx prefix, sockets); empty: a temporary one")

    def with_overrides(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


class SettingsError(ValueError):
    """A setting could not be read: the message names the source and the field."""


def _coerce(name: str, value: Any, source: str) -> Any:
    kind = type(FIELDS[name].default)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    try:
        if kind is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off", ""):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{source}: {name} must be {kind.__name__}, got {value!r}") from None


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
    if not 0 <= settings.gvl_vendor_id <= 0xFFFF:  # a TCF vendor id is 16 bits
        raise SettingsError(f"gvl_vendor_id must be 0-65535, got {settings.gvl_vendor_id}")
    if settings.workers == 0:
        settings = settings.with_overrides(workers=os.cpu_count() or 1)
    return settings
