"""The money loop: signed notices, spend, budgets with pacing, frequency caps.

- ``token``: what every notice URL carries (signed, self-contained bids);
- ``state``: the interface to the shared money state; ``embedded``: it on LMDB for one node;
  ``redis_state``: it on Redis for a fleet (``open_state`` picks one from the setting);
- ``pacing``: how much budget a worker may float now; ``banker``: a worker's floats and
  the reservations it owes the state.

``node_settings`` fills in what every worker of a node must share before they start: the
state's directory (or a Redis it can reach) and the notice keys (from the file, or one random key per node, which
a fleet must replace with a shared one).
"""

from __future__ import annotations

import logging
import secrets
import tempfile
from pathlib import Path

from tafe.money.state import State
from tafe.money.token import Keys
from tafe.settings import Settings, SettingsError

__all__ = ["keys_of", "node_settings", "open_state", "warn_if_random_key"]

log = logging.getLogger("tafe.money")


def node_settings(settings: Settings, run_dir: str | Path | None = None, previous: Settings | None = None) -> Settings:
    """``settings`` with ``state`` and ``notice_keys`` set; a random key survives reloads (``previous``)."""
    changes: dict[str, str] = {}
    run_dir = run_dir or settings.run_dir
    if not settings.state and run_dir:  # shared by the node's workers; otherwise open_state makes one for this process
        changes["state"] = str(Path(run_dir) / "state")
    if settings.notice_keys_file:
        try:
            changes["notice_keys"] = Path(settings.notice_keys_file).read_text().strip()
        except OSError as exc:
            raise SettingsError(f"notice_keys_file {settings.notice_keys_file}: {exc.strerror or exc}") from None
    elif not settings.notice_keys:
        if previous is not None and previous.notice_keys:
            changes["notice_keys"] = previous.notice_keys
        else:
            changes["notice_keys"] = f"{_RANDOM}{secrets.token_hex(3)}:{secrets.token_urlsafe(32)}"
    settings = settings.with_overrides(**changes) if changes else settings
    keys_of(settings)  # refuse bad keys here, with one line
    if _is_redis(settings.state):  # an unreachable Redis is one line at start, not a warning per worker
        state = open_state(settings)
        try:
            state.ping()  # type: ignore[attr-defined]
        except Exception as exc:
            raise SettingsError(f"state {settings.state}: cannot reach Redis: {exc}") from None
        finally:
            state.close()
    return settings


def _is_redis(state: str) -> bool:
    return state.startswith("redis://")


def open_state(settings: Settings) -> State:
    """The money state the setting names: ``redis://HOST:PORT/DB`` for a fleet, else an LMDB directory."""
    if _is_redis(settings.state):
        from tafe.money.redis_state import RedisState

        try:
            return RedisState(settings.state)
        except ValueError as exc:
            raise SettingsError(f"state {settings.state}: {exc}") from None
    import lmdb

    from tafe.money.embedded import EmbeddedState

    if not settings.state:  # one process, no run directory: a state of its own, removed with it
        return EmbeddedState(tempfile.mkdtemp(prefix="tafe-state-"), temporary=True)
    try:
        return EmbeddedState(settings.state)
    except (OSError, lmdb.Error) as exc:  # a directory that cannot be made, read or locked
        raise SettingsError(f"state {settings.state}: {getattr(exc, 'strerror', None) or exc}") from None


_RANDOM = "rnd"  # the key id prefix of a key made at start


def warn_if_random_key(settings: Settings) -> None:
    """Said once the node is up (a start-up error stays the only line): a random key does not outlive the node."""
    if settings.notice_keys.startswith(_RANDOM) and not settings.notice_keys_file:
        log.warning(
            "no notice key set: signing with a random key made at start; after a restart, notices of earlier bids no"
            " longer verify, and every node of a fleet must share one key (TAFE_NOTICE_KEYS or --notice-keys-file)"
        )


def keys_of(settings: Settings) -> Keys:
    try:
        return Keys.parse(settings.notice_keys)
    except ValueError as exc:
        where = f"notice_keys_file {settings.notice_keys_file}" if settings.notice_keys_file else "notice_keys"
        raise SettingsError(f"{where}: {exc}") from None
