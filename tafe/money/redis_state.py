"""The money state on Redis: one store shared by every node of a fleet (``--state redis://HOST:PORT/DB``).

The accounting is exactly the embedded state's (``tafe.money.embedded``, rules in
``tafe.money.state``): floats as leases, reservations with expiry, the even-pacing bucket
debited by spend, first-seen keys living as long as a notice token. Each write is ONE Lua
script, run atomically by Redis (EVALSHA: loaded once, reloaded after a restart); each read
is one command. Numbers are integer nanos; pacing's arithmetic is done in Lua's doubles,
as Python's ``pacing.grant`` does it in floats, so both states grant the same.

Keys (prefix ``tafe:``; one Redis only, Redis Cluster is not supported yet: the scripts
touch keys they compute themselves):

- ``a:PERIOD`` hash: campaign -> "budget spent reserved floated bucket bucket_ms rate"
- ``lease`` hash: ``worker\\0campaign\\0period`` -> "nanos period campaign"; ``leasex``
  sorted set of the same by expiry (ms): swept by ``reserve`` with the caller's clock, so a
  dead worker's float is taken off ``floated`` (a key expiring on its own could not say how
  much it held)
- ``res`` hash: bid id -> "nanos expires period campaign"; ``resx`` sorted set by expiry (s),
  swept by ``reserve`` (at most ``_SWEEP_MAX`` entries a call)
- ``s:KIND:BID``: first-seen keys (``bill``, ``loss``, ``win``, ``imp``, ``click``, ``freq``;
  ``winp`` holds a win's price), expiring with Redis TTLs when their token does
- ``f:USER`` hash: campaign -> "t1 t2 ..." impression times (at most the cap kept)

Every call is cooperative under gevent: redis-py's pure-Python connection over patched
sockets. Calls time out (``FAST_TIMEOUT_S`` on the bid path's frequency read, ``TIMEOUT_S``
otherwise) and are retried only once on a broken connection: every script is idempotent
(first-seen keys; ``reserve`` skips a reservation it already holds), and the callers
decide what a failure means.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tafe.money import pacing
from tafe.money.state import LEASE_S, Account, BidRef, Grant, Reserved, Want

__all__ = ["FAST_TIMEOUT_S", "RedisState", "TIMEOUT_S"]

FAST_TIMEOUT_S = 0.02  # the bid path's frequency read: well under any tmax
TIMEOUT_S = 1.0  # scripts from the money loop and notices
_SWEEP_MAX = 2000
_P = "tafe:"

# Shared by the scripts: accounts cached for the script's run and written back by save().
_PRELUDE = r"""
local P = ARGV[1]
local cache, order = {}, {}
local function I(x) return string.format('%d', x) end
local function acct(period, campaign)
  local ck = period .. ' ' .. campaign
  local a = cache[ck]
  if a then return a end
  a = {0, 0, 0, 0, 0, 0, 0}
  local v = redis.call('HGET', P .. 'a:' .. period, campaign)
  if v then
    local i = 1
    for n in string.gmatch(v, '%S+') do a[i] = tonumber(n); i = i + 1 end
  end
  cache[ck] = a
  order[#order + 1] = {period, campaign, a}
  return a
end
local function save()
  for _, e in ipairs(order) do
    local a = e[3]
    redis.call('HSET', P .. 'a:' .. e[1], e[2], table.concat({I(a[1]), I(a[2]), I(a[3]), I(a[4]), I(a[5]), I(a[6]), I(a[7])}, ' '))
  end
end
local function first(kind, bid, expires, value)
  return redis.call('SET', P .. 's:' .. kind .. ':' .. bid, value, 'NX', 'EXAT', expires) ~= false
end
-- Release a reservation (all, or down to keep); what it held goes back to the pacing bucket.
local function drop_res(bid, keep)
  local v = redis.call('HGET', P .. 'res', bid)
  if not v then return false end
  local nanos, expires, period, campaign = string.match(v, '^(%S+) (%S+) (%S+) (.*)$')
  nanos = tonumber(nanos)
  local a = acct(period, campaign)
  if keep > 0 and keep < nanos then
    a[3] = a[3] - (nanos - keep)
    a[5] = a[5] + (nanos - keep)
    redis.call('HSET', P .. 'res', bid, I(keep) .. ' ' .. expires .. ' ' .. period .. ' ' .. campaign)
  elseif keep == 0 then
    a[3] = a[3] - nanos
    a[5] = a[5] + nanos
    redis.call('HDEL', P .. 'res', bid)
    redis.call('ZREM', P .. 'resx', bid)
  end
  return true
end
"""

# ARGV: prefix, worker, now (s), now_ms, lease_ms, sweep max, burst_s, n used, then
# 5 per used (bid, campaign, period, nanos, expires), then 6 per want.
_RESERVE = (
    _PRELUDE
    + r"""
local worker, now, now_ms = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local lease_ms, sweep, burst, nused = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local function trunc(x) if x >= 0 then return math.floor(x) end return math.ceil(x) end
-- Sweep: silent workers' floats, timed-out reservations (first-seen keys expire by TTL).
for _, lkey in ipairs(redis.call('ZRANGEBYSCORE', P .. 'leasex', '-inf', '(' .. I(now_ms), 'LIMIT', 0, sweep)) do
  local v = redis.call('HGET', P .. 'lease', lkey)
  if v then
    local n, period, campaign = string.match(v, '^(%S+) (%S+) (.*)$')
    local a = acct(period, campaign)
    a[4] = a[4] - tonumber(n)
  end
  redis.call('HDEL', P .. 'lease', lkey)
  redis.call('ZREM', P .. 'leasex', lkey)
end
for _, bid in ipairs(redis.call('ZRANGEBYSCORE', P .. 'resx', '-inf', '(' .. I(math.floor(now)), 'LIMIT', 0, sweep)) do
  if not drop_res(bid, 0) then redis.call('ZREM', P .. 'resx', bid) end
end
-- 1. What was bid since the last call becomes reservations, unless a notice settled it first.
local used_by = {}
local i = 9
for _ = 1, nused do
  local bid, campaign, period, nanos, expires = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3]), ARGV[i + 4]
  i = i + 5
  local a = acct(period, campaign)
  local ck = period .. ' ' .. campaign
  if redis.call('HEXISTS', P .. 'res', bid) == 1 then
    -- reported already (a reply lost on the way back, the call retried): nothing to add
  elseif redis.call('EXISTS', P .. 's:bill:' .. bid, P .. 's:loss:' .. bid) > 0 then
    used_by[ck] = (used_by[ck] or 0) + nanos
    a[5] = a[5] + nanos
  else
    used_by[ck] = (used_by[ck] or 0) + nanos
    local won = redis.call('GET', P .. 's:winp:' .. bid)
    local held = nanos
    if won then held = math.min(nanos, tonumber(won)) end
    a[3] = a[3] + held
    a[5] = a[5] + (nanos - held)
    redis.call('HSET', P .. 'res', bid, I(held) .. ' ' .. expires .. ' ' .. period .. ' ' .. campaign)
    redis.call('ZADD', P .. 'resx', expires, bid)
  end
end
-- 2. Return this worker's previous floats, grant new ones by pacing.
local out = {}
while i <= #ARGV do
  local campaign, period, period_end, budget = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  local pace, want = ARGV[i + 4], tonumber(ARGV[i + 5])
  i = i + 6
  local a = acct(period, campaign)
  a[1] = budget
  local lkey = worker .. '\0' .. campaign .. '\0' .. period
  local old = redis.call('HGET', P .. 'lease', lkey)
  if old then
    local held = tonumber(string.match(old, '^(%S+)'))
    a[4] = a[4] - held
    a[5] = a[5] + math.max(held - (used_by[period .. ' ' .. campaign] or 0), 0)
  end
  local left = math.max(a[1] - a[2] - a[3] - a[4], 0)
  local granted
  if pace == 'asap' then
    granted = math.min(want, left)
    a[5], a[7] = 0, 0
  else
    local rate = left / math.max(period_end - now, 1.0)
    local level = math.min(a[5] + rate * math.max(now - a[6] / 1000, 0.0), rate * burst)
    granted = math.max(math.min(want, trunc(level), left), 0)
    a[5], a[7] = trunc(level) - granted, trunc(rate)
  end
  a[6] = now_ms
  a[4] = a[4] + granted
  redis.call('HSET', P .. 'lease', lkey, I(granted) .. ' ' .. period .. ' ' .. campaign)
  redis.call('ZADD', P .. 'leasex', I(now_ms + lease_ms), lkey)
  out[#out + 1] = {campaign, granted, a[1], a[2], a[3], a[4], a[7]}
end
save()
return out
"""
)

# ARGV: prefix, bid, period, campaign, expires, nanos
_COMMIT = (
    _PRELUDE
    + r"""
local bid, period, campaign, expires, nanos = ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
if not first('bill', bid, expires, '1') then return 0 end
local a = acct(period, campaign)
a[2] = a[2] + nanos
a[5] = a[5] - nanos
drop_res(bid, 0)
save()
return 1
"""
)

# ARGV: prefix, kind, bid, expires, keep
_RELEASE = (
    _PRELUDE
    + r"""
local kind, bid, expires, keep = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
if not first(kind, bid, expires, '1') then return 0 end
if redis.call('EXISTS', P .. 's:bill:' .. bid) > 0 then return 1 end
if kind == 'win' then first('winp', bid, expires, I(keep)) else keep = 0 end
drop_res(bid, keep)
save()
return 1
"""
)

# ARGV: prefix, bid, expires, user, campaign, now (whole s), keep
_IMPRESSION = (
    _PRELUDE
    + r"""
local bid, expires, user, campaign, now, keep = ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
if not first('freq', bid, expires, '1') then return 0 end
local times = {}
for t in string.gmatch(redis.call('HGET', P .. 'f:' .. user, campaign) or '', '%S+') do times[#times + 1] = tonumber(t) end
times[#times + 1] = now
table.sort(times)
local kept = {}
if keep > 0 then
  for j = math.max(#times - keep + 1, 1), #times do kept[#kept + 1] = I(times[j]) end
end
redis.call('HSET', P .. 'f:' .. user, campaign, table.concat(kept, ' '))
return 1
"""
)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _client(url: str, timeout: float) -> redis.Redis:
    """Retried once on a broken connection only (a pooled one from before a Redis restart; every call is
    idempotent), never on a timeout: the caller decides what a slow Redis means."""
    retry = Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))
    return redis.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=retry, health_check_interval=0
    )


class RedisState:
    """``tafe.money.state.State`` on the Redis at ``url`` (``redis://HOST:PORT/DB``)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "redis" or not parts.hostname:
            raise ValueError("not a redis://HOST:PORT/DB URL")
        self.url = url
        self._r = _client(url, TIMEOUT_S)
        self._fast = _client(url, FAST_TIMEOUT_S)
        self._reserve = self._r.register_script(_RESERVE)
        self._commit = self._r.register_script(_COMMIT)
        self._release = self._r.register_script(_RELEASE)
        self._impression = self._r.register_script(_IMPRESSION)

    def ping(self) -> None:
        """Raise if Redis cannot be reached (checked once at start, to say so in one line)."""
        self._r.ping()

    def reserve(self, worker: str, used: Sequence[Reserved], wants: Sequence[Want], now: float) -> dict[str, Grant]:
        now_ms = int(now * 1000)
        args: list[Any] = [_P, worker, repr(float(now)), now_ms, int(LEASE_S * 1000), _SWEEP_MAX, repr(pacing.BURST_S), len(used)]
        for r in used:
            args += r  # bid id, campaign, period, nanos, expires
        for w in wants:
            args += (w.campaign, w.period, w.period_end, w.budget, w.pacing, w.want)
        out = {}
        for cid, granted, budget, spent, reserved, floated, rate in self._reserve(args=args):
            out[_text(cid)] = Grant(granted, Account(budget=budget, spent=spent, reserved=reserved, floated=floated, rate=rate))
        return out

    def commit(self, bid: BidRef, nanos: int, now: float) -> bool:
        return bool(self._commit(args=[_P, bid.bid_id, bid.period, bid.campaign, bid.expires, nanos]))

    def release(self, kind: str, bid: BidRef, keep: int, now: float) -> bool:
        return bool(self._release(args=[_P, kind, bid.bid_id, bid.expires, keep]))

    def count_impression(self, bid: BidRef, keep: int, now: float) -> bool:
        if not bid.user:
            return False
        return bool(self._impression(args=[_P, bid.bid_id, bid.expires, bid.user, bid.campaign, int(now), keep]))

    def first_seen(self, kind: str, bid: BidRef) -> bool:
        return bool(self._r.set(f"{_P}s:{kind}:{bid.bid_id}", b"1", nx=True, exat=bid.expires))

    def frequency(self, user: str) -> Mapping[str, Sequence[int]]:
        raw = self._fast.hgetall(f"{_P}f:{user}")
        return {_text(k): [int(t) for t in v.split()] for k, v in raw.items()}

    def accounts(self, period: int) -> dict[str, Account]:
        out = {}
        for cid, value in self._r.hgetall(f"{_P}a:{period}").items():
            b, s, r, f, _, _, rate = (int(n) for n in value.split())
            out[_text(cid)] = Account(budget=b, spent=s, reserved=r, floated=f, rate=rate)
        return out

    def capped_users(
        self, limits: Mapping[str, int], windows: Mapping[str, int], now: float, scan: int = 100_000
    ) -> dict[str, int]:
        """Users at their cap now, per campaign (of about the first ``scan`` users: a debugging view)."""
        out = dict.fromkeys(limits, 0)
        for i, key in enumerate(self._r.scan_iter(match=f"{_P}f:*", count=1000)):
            if i >= scan:
                break
            for cid, times in self._r.hgetall(key).items():
                c = _text(cid)
                if c in limits and sum(1 for t in times.split() if int(t) > now - windows[c]) >= limits[c]:
                    out[c] += 1
        return out

    def flush(self) -> None:
        """Nothing to do here: durability is Redis's own (``appendonly yes`` keeps every write)."""

    def close(self) -> None:
        self._r.close()
        self._fast.close()
