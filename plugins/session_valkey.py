"""Sessions in Valkey (or Redis): any replica serves any request of any call.

Every key of a call carries the call's hash tag, so a call lives in one cluster slot:

    {prefix}:{CallSid}:s     the Session (msgpack)
    {prefix}:{CallSid}:c     the current turn id
    {prefix}:{CallSid}:lock  the transition lease: its holder's token (PX expiry, renewed while held)
    {prefix}:{CallSid}:g     the current turn's generation number (fence): 1, raised by each take_over
    {prefix}:{CallSid}:h     the generation's lease: the fence, PX expiry, renewed while it generates
    {prefix}:{CallSid}:v     segments of the current turn handed to Twilio (list of msgpack Segments)
    {prefix}:{CallSid}:q     segments queued for /continue (list; only ever the current turn's)
    {prefix}:{CallSid}:r     stored replies: hash speech-or-continuation key -> msgpack [turn, [segments]];
                             only the previous and the current turn's survive a turn change, as in memory
    {prefix}:blob:<key>      bytes from put_blob (synthesised audio), with their own TTL
    {prefix}:events          the pub/sub channel: cancelled turns and "segments pushed" wake-ups

Each method is one round trip: a Lua script (EVALSHA; EVAL when a server forgot it) where it must be
atomic, a plain command elsewhere. Whatever the process issues in one event-loop iteration (many
calls' commands, under load) leaves in one write, packed by libvalkey's C packer, on the process's one
connection to the server (its Line), which matches the replies to their callers as they arrive: a
pipeline with no task, pooled connection or timer per round trip (on a cluster, one line per node).
Every write slides the call's TTL with PEXPIRE, so nothing needs sweeping. A new call costs one round
trip (create: SET NX), an ordinary turn three: begin, commit, serve (bench/valkey_roundtrips.py
counts them).

wait() does not hold a connection: it looks at the queue once, then sleeps on a local event that the
process's one pub/sub subscription sets when any replica pushes to that call (pushes publish in
the same script); without a subscription it looks again every 0.25 s. (A blocking BLMOVE would hold a
pooled connection per waiting /continue and need a socket timeout longer than the wait, which would
also slow down noticing a dead server.)

On a Valkey Cluster (VALKEY_URL names any node; INFO says so when the server first answers, or
VALKEY_CLUSTER=1/0 does) each call's keys share one hash tag, so every script runs on the one node that
holds the call. A flight is split by node, each node's part answered on its own (a slow node never holds
up the calls of the others); MOVED updates the slot table,
ASK sends ASKING and the command in one write, TRYAGAIN (a script whose keys straddle a slot being moved)
is retried with backoff for up to VALKEY_TIMEOUT. Pub/sub stays classic: a PUBLISH inside a script reaches
the subscribers of every node over the cluster bus.

Faults: a connection error or timeout (VALKEY_TIMEOUT, short) becomes main.BackendError, which the
webhooks answer with a spoken apology; the first failure of each class and the recovery are logged
once. The next command after a failure dials a new line, and the one pub/sub subscription per process
resubscribes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

import msgspec

from main import (
    BUSY,
    LEASE_SECONDS,
    ORPHANED,
    SUPERSEDED,
    BackendError,
    ConfigError,
    Lease,
    Register,
    Segment,
    Session,
    SessionBackend,
    Settings,
    Snapshot,
    Takeover,
    hookimpl,
    log,
    segment_decoder,
    session_decoder,
)

LEASE_MS = int(LEASE_SECONDS * 1000)

encoder = msgspec.msgpack.Encoder()
reply_decoder = msgspec.msgpack.Decoder(tuple[str, list[Segment]])

# msgpack headers written by Lua (the replies are built server-side from already encoded segments)
_MSGPACK = """
local function mpstr(s)
  local n = #s
  if n < 32 then return string.char(160 + n) .. s end
  if n < 256 then return string.char(217, n) .. s end
  return string.char(218, math.floor(n / 256), n % 256) .. s
end
local function mparr(n)
  if n < 16 then return string.char(144 + n) end
  return string.char(220, math.floor(n / 256), n % 256)
end
-- whether the served list ends with the reply's end: an "end" Segment is {"kind": "end", ...} (fields in order),
-- after a one-byte fixmap header or, for a struct of more than 15 fields, a three-byte map16 header
local function ended(v)
  local last = redis.call('LINDEX', v, -1)
  if not last then return false end
  local first = string.byte(last, 1)
  local at = (first == 222) and 4 or 2
  return string.sub(last, at, at + 8) == '\\164kind\\163end'
end
"""

# KEYS lock s c v r | ARGV token lock_ms ttl_ms reply-key...   -> nil when locked, else {session, served, replies}
BEGIN = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return false end
for i = 2, 5 do redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
local out = {redis.call('GET', KEYS[2]) or '', redis.call('LRANGE', KEYS[4], 0, -1)}
if #ARGV > 3 then out[3] = redis.call('HMGET', KEYS[5], unpack(ARGV, 4)) end
return out
"""

# KEYS lock s c v q r g h | ARGV token session('' deletes) changed current ttl_ms channel cancel-message lease_ms
COMMIT = (
    _MSGPACK
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local ttl = ARGV[5]
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8])
else
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ttl)
  if ARGV[3] == '1' then
    -- keep the replies of the turn just finished (late retries), drop older ones
    local keep = '\\146' .. mpstr(redis.call('GET', KEYS[3]) or '')
    local replies = redis.call('HGETALL', KEYS[6])
    for i = 1, #replies, 2 do
      if string.sub(replies[i + 1], 1, #keep) ~= keep then redis.call('HDEL', KEYS[6], replies[i]) end
    end
    if ARGV[4] == '' then
      redis.call('DEL', KEYS[3], KEYS[7], KEYS[8])
    else  -- the committer generates the new turn: generation 1, its lease held
      redis.call('SET', KEYS[3], ARGV[4])
      redis.call('SET', KEYS[7], '1', 'PX', ttl)
      redis.call('SET', KEYS[8], '1', 'PX', ARGV[8])
    end
    redis.call('DEL', KEYS[4], KEYS[5])
  end
  redis.call('DEL', KEYS[1])
  redis.call('PEXPIRE', KEYS[3], ttl)
  redis.call('PEXPIRE', KEYS[4], ttl)
  redis.call('PEXPIRE', KEYS[6], ttl)
end
if ARGV[7] ~= '' then redis.call('PUBLISH', ARGV[6], ARGV[7]) end
return 1
"""
)

# KEYS c q g | ARGV turn ttl_ms channel message fence segment...
PUSH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if (redis.call('GET', KEYS[3]) or '1') ~= ARGV[5] then return 0 end  -- taken over: fenced off
if #ARGV > 5 then redis.call('RPUSH', KEYS[2], unpack(ARGV, 6)) end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""

# KEYS c lock q v r g h | ARGV turn ttl_ms nkeys given fence key... segment...
SERVE = (
    _MSGPACK
    + """
local turn = ARGV[1]
if redis.call('GET', KEYS[1]) ~= turn then return 'superseded' end
local nkeys, given = tonumber(ARGV[3]), ARGV[4] == '1'
if given and (redis.call('GET', KEYS[6]) or '1') ~= ARGV[5] then return 'superseded' end  -- fenced off
if redis.call('EXISTS', KEYS[2]) == 1 then return 'busy' end
local items
if given then
  items = {}
  for i = 6 + nkeys, #ARGV do items[#items + 1] = ARGV[i] end
else
  items = redis.call('LRANGE', KEYS[3], 0, -1)
  redis.call('DEL', KEYS[3])
end
if #items == 0 then
  if not given and redis.call('EXISTS', KEYS[7]) == 0 and not ended(KEYS[4]) then return 'orphaned' end
  return {}
end
for i = 1, #items, 1000 do redis.call('RPUSH', KEYS[4], unpack(items, i, math.min(i + 999, #items))) end
if nkeys > 0 then
  local value = '\\146' .. mpstr(turn) .. mparr(#items) .. table.concat(items)
  local fields = {}
  for i = 6, 5 + nkeys do fields[#fields + 1] = ARGV[i]; fields[#fields + 1] = value end
  redis.call('HSET', KEYS[5], unpack(fields))
end
redis.call('PEXPIRE', KEYS[4], ARGV[2])
redis.call('PEXPIRE', KEYS[5], ARGV[2])
if given then return 1 end
return items
"""
)

# KEYS lock c g h | ARGV token turn fence lease_ms: the transition lease (token) or the turn's generation lease
RENEW = """
if ARGV[1] ~= '' then
  if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
  return redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
if redis.call('GET', KEYS[2]) ~= ARGV[2] or (redis.call('GET', KEYS[3]) or '1') ~= ARGV[3] then return 0 end
redis.call('SET', KEYS[4], ARGV[3], 'PX', ARGV[4])
return 1
"""

# KEYS c g h s v q | ARGV turn lease_ms ttl_ms -> nil, or {fence, session, served}
TAKE_OVER = (
    _MSGPACK
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] or redis.call('EXISTS', KEYS[3]) == 1 or ended(KEYS[5]) then
  return false
end
local session = redis.call('GET', KEYS[4])
if not session then return false end
local fence = tonumber(redis.call('GET', KEYS[2]) or '1') + 1
redis.call('SET', KEYS[2], fence, 'PX', ARGV[3])
redis.call('SET', KEYS[3], fence, 'PX', ARGV[2])
redis.call('DEL', KEYS[6])  -- queued by the dead generation, never handed to Twilio: the new one says it again
return {fence, session, redis.call('LRANGE', KEYS[5], 0, -1)}
"""
)

# KEYS lock | ARGV token
UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


try:  # libvalkey, valkey's C extension (pinned beside it), packs the commands and parses the replies
    from libvalkey import pack_command
except ImportError:  # pragma: no cover - the backend says what to install
    pack_command = None  # type: ignore[assignment]


def pack(commands: Sequence[tuple[Any, ...]]) -> bytes:
    return b"".join([pack_command(command) for command in commands])


NOT_ENOUGH_DATA = object()


class Line(asyncio.Protocol):
    """One connection to a Valkey server that carries every command of the process, pipelined: each event-loop
    iteration's commands leave in one write as soon as they are issued, and the replies are matched to their
    futures in order as they arrive, parsed by libvalkey in data_received. A round trip costs no task, no pooled
    connection and no timer of its own (bench/valkey_line.py prices the pooled round trip it replaced).
    valkey-py's own connection dials, authenticates and selects the database (so every URL option it knows
    works); the line then takes over its transport.

    A command unanswered for `timeout` seconds (the connection's socket_timeout) fails the line and everything
    on it: one timer, set for the oldest command outstanding. A lost connection fails what was on it; the next
    flight dials a new line. Valkey answers in order, so one slow command (a long script) holds up the ones
    behind it, as it would hold up the single-threaded server anyway."""

    def __init__(
        self, connection: Any, where: str, on_noscript: Callable[[tuple[Any, ...], asyncio.Future[Any]], None]
    ) -> None:
        import libvalkey
        from valkey.exceptions import InvalidResponse

        self.reader = libvalkey.Reader(  # error replies become the connection's parser's exceptions (MOVED: MovedError)
            protocolError=InvalidResponse, replyError=connection._parser.parse_error, notEnoughData=NOT_ENOUGH_DATA
        )
        self.where = where
        self.timeout = connection.socket_timeout or 5.0
        self.on_noscript = on_noscript
        self.loop = asyncio.get_running_loop()
        # what was sent and not yet answered, in order: (command, future, when sent)
        self.waiting: collections.deque[tuple[tuple[Any, ...], asyncio.Future[Any], float]] = collections.deque()
        self.watchdog: asyncio.TimerHandle | None = None
        self.failure: Exception | None = None  # set once the line is done for; the next flight dials anew
        # valkey-py's streams, connected and handshaken: the line keeps them, since a StreamWriter closes its
        # transport when freed, and takes their transport; the connection no longer owns it (nor closes it)
        self.streams = connection._reader, connection._writer
        self.transport: Any = connection._writer.transport
        self.transport.set_protocol(self)
        connection._writer = connection._reader = None

    def send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        now = self.loop.time()
        self.transport.write(pack([command for command, _ in batch]))
        self.waiting.extend([(command, future, now) for command, future in batch])
        if self.watchdog is None:
            self.watchdog = self.loop.call_at(now + self.timeout, self._check)

    def data_received(self, data: bytes) -> None:
        from valkey.exceptions import NoScriptError

        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not NOT_ENOUGH_DATA:
                command, future, _ = self.waiting.popleft()
                if future.done():  # its caller gave up
                    continue
                if isinstance(reply, Exception):
                    if isinstance(reply, NoScriptError) and command[0] == "EVALSHA":
                        self.on_noscript(command, future)
                    else:
                        future.set_exception(reply)
                else:
                    future.set_result(reply)
        except Exception as e:  # a reply that is not RESP, or one nobody asked for: nothing after it can be trusted
            self.fail(e)

    def _check(self) -> None:
        """Fail the line when its oldest command has waited `timeout`; else look again when the new oldest will."""
        from valkey.exceptions import TimeoutError

        self.watchdog = None
        if not self.waiting or self.failure is not None:
            return
        due = self.waiting[0][2] + self.timeout
        if self.loop.time() >= due:
            self.fail(TimeoutError(f"Timeout reading from {self.where}"))
        else:
            self.watchdog = self.loop.call_at(due, self._check)

    def fail(self, error: Exception) -> None:
        if self.failure is None:
            self.failure = error
            self.transport.abort()
        while self.waiting:
            _, future, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)

    def connection_lost(self, exc: Exception | None) -> None:
        from valkey.exceptions import ConnectionError

        self.fail(ConnectionError(f"Connection to {self.where} lost: {exc or 'closed by the server'}"))
        if self.watchdog is not None:
            self.watchdog.cancel()

    def usable(self) -> bool:
        return self.failure is None and not self.transport.is_closing() and self.loop is asyncio.get_running_loop()

    async def aclose(self) -> None:
        """Let what is on the line be answered (for at most `timeout`), then close it."""
        deadline = self.loop.time() + self.timeout
        while self.waiting and self.failure is None and self.loop.time() < deadline:
            await asyncio.sleep(0.005)
        self.failure = self.failure or ConnectionError("closed")
        self.transport.close()


def server_name(url: str) -> str:
    """Where the URL points, fit for a log line: scheme, host, port and database, never credentials."""
    parts = urlsplit(url)
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path if parts.path != '/' else ''}"


def pool_options(url: str, timeout: float, max_connections: int) -> dict[str, Any]:
    """Connection pool options for a Valkey/Redis URL; the URL's own query options win (valkey-py's rule)."""
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "socket_keepalive": True,
        "max_connections": max_connections,
        "timeout": timeout,  # waiting for a free pooled connection
        "client_name": "switchboard",
    }
    scheme = urlsplit(url).scheme.lower()
    query = parse_qs(urlsplit(url).query)
    if scheme in ("rediss", "valkeys") and query.get("ssl_cert_reqs", ["required"])[0] == "required":
        options["ssl_check_hostname"] = True  # a verified certificate must also name the server we asked for
    return options


def cluster_options(url: str, timeout: float, max_connections: int) -> dict[str, Any]:
    """The same for a cluster client: per node, and no wait for a free connection (the backend queues flights)."""
    options = pool_options(url, timeout, max_connections)
    del options["timeout"]
    return options


def key_of(command: tuple[Any, ...]) -> Any:
    """The key a command's cluster slot is computed from (a script's first key), or None for PING and INFO."""
    if command[0] in ("EVALSHA", "EVAL"):
        return command[3] if int(command[2]) else None
    return command[1] if command[0] not in ("PING", "INFO") else None


class ValkeyBackend(SessionBackend):
    """Calls in Valkey: every replica sees every call; one line per server (or cluster node) and one subscription
    per process."""

    def __init__(self, settings: Settings) -> None:
        url = settings.valkey_url
        if not url:
            raise ConfigError(
                "VALKEY_URL is not set (nor REDIS_URL); SESSION_BACKEND=valkey needs it. Set VALKEY_URL to your "
                "server, e.g. redis://localhost:6379/0 (on Railway: REDIS_URL=${{Redis.REDIS_URL}}), "
                "or choose SESSION_BACKEND=memory."
            )
        import valkey.asyncio as valkey  # the SDK is loaded only when this backend is selected

        if pack_command is None:  # pragma: no cover - requirements.txt pins it
            raise ConfigError("SESSION_BACKEND=valkey needs libvalkey: pip install -r requirements.txt")
        from valkey.exceptions import ConnectionError, TimeoutError, ValkeyClusterException, ValkeyError

        # what a round trip can raise: all of it becomes BackendError (a cluster nobody answers for is the last)
        self.errors = (ValkeyError, OSError, ValkeyClusterException)
        self.unreachable = (ConnectionError, TimeoutError, OSError, ValkeyClusterException)
        self.url = url

        self.prefix = settings.get("VALKEY_PREFIX", "sb")
        self.timeout = settings.number("VALKEY_TIMEOUT", 1.0, unit="seconds")
        self.size = size = settings.number("VALKEY_MAX_CONNECTIONS", 64)
        self.where = server_name(url)
        mode = settings.get("VALKEY_CLUSTER").strip().lower()
        if mode not in ("", "auto", "0", "1", "false", "true", "no", "yes"):
            raise ConfigError(
                f"VALKEY_CLUSTER must be 1, 0 or unset (detected when Valkey first answers), not {mode!r}"
            )
        # whether VALKEY_URL names a cluster node: None until the server first answers INFO, unless said
        self.is_cluster: bool | None = None if mode in ("", "auto") else mode in ("1", "true", "yes")
        try:
            self.pool = valkey.BlockingConnectionPool.from_url(url, **pool_options(url, self.timeout, size))
            self.pool.make_connection()  # checks the URL's options now (no network), not at the first call
            self.cluster: Any = self._cluster() if self.is_cluster else None  # else made when INFO says cluster
        except (ValueError, TypeError, ValkeyError, ValkeyClusterException) as e:
            raise ConfigError(f"VALKEY_URL (or REDIS_URL) is not a usable Valkey/Redis URL: {e}") from None
        self.client = valkey.Valkey(connection_pool=self.pool)
        self.connecting = asyncio.Lock()
        self.stale = False  # a cluster node failed: ask the cluster who holds what before the next flight
        self.refreshing: asyncio.Future[None] | None = None
        self.listen_turn = 0  # which cluster node the subscription uses next (it moves on after a failure)
        self.ttl_ms = max(1, int(settings.session_ttl * 1000))
        self.channel = f"{self.prefix}:events"
        self.origin = secrets.token_hex(4)  # this process, so it can skip its own pub/sub messages
        self.scripts = {
            hashlib.sha1(src.encode()).hexdigest(): src
            for src in (BEGIN, COMMIT, PUSH, SERVE, UNLOCK, RENEW, TAKE_OVER)
        }
        self.sha = {src: sha for sha, src in self.scripts.items()}
        self.pending: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self.flushing: set[asyncio.Task[None]] = set()
        # the connection every command goes out on, by cluster node name ("" on one server), and those being dialled
        self.lines: dict[str, Line] = {}
        self.dialing: dict[str, asyncio.Future[Line]] = {}
        self.cancel_callbacks: list[Callable[[str], None]] = []
        self.waiters: dict[str, set[asyncio.Event]] = {}
        self.listening = False  # the subscription is up, so pushes from other replicas wake waiters
        self.subscribed = asyncio.Event()
        self.listener: asyncio.Task[None] | None = None
        self.outage: dict[str, float] = {}  # failure class -> when first seen, while failing

    # -- lifecycle and faults

    async def aopen(self) -> None:
        """Start the subscription; an unreachable server is logged, not fatal (/health answers 503 meanwhile)."""
        self.listener = asyncio.create_task(self._listen_forever(), name="valkey-subscription")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.subscribed.wait(), self.timeout * 2)
        if not self.subscribed.is_set():
            with contextlib.suppress(BackendError):
                await self.ping()
            log.warning(
                "starting without valkey: /health answers 503 and callers hear an apology until it answers",
                extra={"server": self.where},
            )

    async def aclose(self) -> None:
        if self.listener is not None:
            self.listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.listener
        if self.flushing:
            await asyncio.wait(self.flushing, timeout=self.timeout * 2)
        for line in self.lines.values():
            if line.usable():
                await line.aclose()
        await self.client.aclose()
        with contextlib.suppress(RuntimeError):  # connections made on an event loop already closed (tests do that)
            await self.pool.aclose()
            if self.cluster is not None:
                await self.cluster.aclose()

    def _failed(self, error: BaseException) -> BackendError:
        """Log the first failure of each class (not every request), and say it as a BackendError."""
        kind = type(error).__name__
        if kind not in self.outage:
            self.outage[kind] = time.monotonic()
            what = "valkey unreachable" if isinstance(error, self.unreachable) else "valkey failed"
            log.error(what, extra={"server": self.where, "error": f"{kind}: {error}"})
        return BackendError(f"valkey {kind}: {error}", reported=True)

    def _recovered(self) -> None:
        down = round(time.monotonic() - min(self.outage.values()), 1)
        log.warning("valkey reachable again", extra={"server": self.where, "down_s": down})
        self.outage.clear()

    # -- sending: every command this process issues in one loop iteration leaves in one pipeline

    def _send(self, *command: Any) -> asyncio.Future[Any]:
        """Queue a command for the next flight; the future resolves with its reply."""
        future = asyncio.get_running_loop().create_future()
        self._queue(command, future)
        return future

    def _queue(self, command: tuple[Any, ...], future: asyncio.Future[Any]) -> None:
        self.pending.append((command, future))
        if len(self.pending) == 1:
            asyncio.get_running_loop().call_soon(self._take_off)

    def _script(self, source: str, keys: Sequence[str], args: Sequence[Any]) -> asyncio.Future[Any]:
        return self._send("EVALSHA", self.sha[source], len(keys), *keys, *args)

    def _take_off(self) -> None:
        batch, self.pending = self.pending, []
        line = self.lines.get("")
        if line is not None and line.usable():  # on one server: straight onto the line
            line.send(batch)
            return
        for flight in self._by_node(batch) if self.cluster is not None else [batch]:
            task = asyncio.ensure_future(self._fly(flight))
            self.flushing.add(task)
            task.add_done_callback(self.flushing.discard)

    def _node_of(self, command: tuple[Any, ...]) -> Any:
        """The cluster node that holds the command's slot, as last known (the default node for PING and INFO)."""
        key = key_of(command)
        if key is None:
            return self.cluster.get_default_node()
        return self.cluster.nodes_manager.get_node_from_slot(self.cluster.keyslot(key))

    def _by_node(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> list[list[Any]]:
        """On a cluster, one flight per node, each answered on its own: a slow node never holds up the calls of
        the others. (Before the cluster's slots are known, one flight that _cluster_round_trip splits.)"""
        if not self.cluster.nodes_manager.slots_cache:
            return [batch]
        flights: dict[str, list[Any]] = {}
        for entry in batch:
            try:
                name = self._node_of(entry[0]).name
            except self.errors:  # a slot no node covers: the round trip says so, for that command
                name = ""
            flights.setdefault(name, []).append(entry)
        return list(flights.values())

    def _again(self, command: tuple[Any, ...], future: asyncio.Future[Any]) -> None:
        """The server forgot a script (a restart, SCRIPT FLUSH): run it with EVAL, which loads it too."""
        self._queue(("EVAL", self.scripts[command[1]], *command[2:]), future)

    async def _fly(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        """One round trip for the whole batch (a pipeline, not a transaction: each command is its own script):
        on one server, onto the line once it is dialled; on a cluster, to the nodes holding the keys."""
        try:
            if self.is_cluster is None:  # not asked yet (a cluster is made as soon as it is known)
                await self._connect()
            if self.cluster is None:
                (await self._line()).send(batch)
                return
            replies = await self._cluster_round_trip([command for command, _ in batch])
        except BaseException as e:  # the connection failed or timed out: every command in the flight did
            error = e if isinstance(e, Exception) else BackendError("valkey: shutting down")
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(e, Exception):
                raise
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            if not future.done():
                if isinstance(reply, Exception):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)

    async def _line(self, node: Any = None) -> Line:
        """The line to the server (or to a cluster node), dialled once for everyone who needs it now (again
        after it failed)."""
        name = "" if node is None else node.name
        line = self.lines.get(name)
        if line is not None and line.usable():
            return line
        dialing = self.dialing.get(name)
        if dialing is None or dialing.done():
            dialing = self.dialing[name] = asyncio.ensure_future(self._dial(node))
        line = await asyncio.shield(dialing)
        if line.failure is not None:  # lost as soon as it was dialled
            raise line.failure
        return line

    async def _dial(self, node: Any) -> Line:
        if node is None:
            connection = self.pool.make_connection()
        else:
            connection = node.connection_class(**node.connection_kwargs)
        await connection.connect()  # valkey-py dials, authenticates, selects the database, names the client
        line = Line(connection, self.where if node is None else node.name, self._again)
        self.lines["" if node is None else node.name] = line
        return line

    # -- a cluster: each command goes to the node holding its slot; one write per node per flight

    def _cluster(self) -> Any:
        import valkey.asyncio as valkey

        return valkey.ValkeyCluster.from_url(self.url, **cluster_options(self.url, self.timeout, self.size))

    async def _connect(self) -> None:
        """Learn once whether VALKEY_URL names a cluster node (INFO's cluster_enabled), unless VALKEY_CLUSTER said."""
        async with self.connecting:
            if self.is_cluster is None:
                connection = self.pool.make_connection()  # a connection of its own, closed after
                try:
                    await connection.send_command("INFO", "cluster", check_health=False)
                    info = await connection.read_response()
                finally:
                    await connection.disconnect()
                self.is_cluster = b"cluster_enabled:1" in info
                if self.is_cluster:
                    self.cluster = self._cluster()
                    log.info("valkey is a cluster", extra={"server": self.where})

    async def _cluster_round_trip(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Group the flight by node (the slot of each command's key), one write per node, all at once; then
        follow MOVED (the slot moved for good: note its new owner), ASK (it is moving: ASKING + the command on
        the node named) and TRYAGAIN for the commands that got one. A script whose keys are not all on one side
        of a moving slot (absent keys count: no lock, no queue) gets TRYAGAIN until the move is over, so it is
        sent again, backing off, for up to VALKEY_TIMEOUT."""
        from valkey.exceptions import AskError, MovedError, TryAgainError

        cluster = self.cluster
        await cluster.initialize()  # once; again after a failed start
        if self.stale:
            self.stale = False
            await self._refresh()
        replies: list[Any] = [None] * len(commands)
        todo: dict[int, Any] = dict.fromkeys(range(len(commands)))  # index -> the node an ASK named, or None
        give_up = asyncio.get_running_loop().time() + self.timeout  # TRYAGAIN lasts as long as the slot's move
        for attempt in range(16):
            flights: dict[tuple[str, bool], tuple[Any, list[int]]] = {}
            for i, asked in todo.items():
                node = asked or self._node_of(commands[i])
                flights.setdefault((node.name, asked is not None), (node, []))[1].append(i)
            writes = [
                self._on_node(node, [commands[i] for i in at], asking=asking)
                for (_, asking), (node, at) in flights.items()
            ]
            if len(writes) == 1:  # the usual case (_take_off split the batch by node): no task per node
                try:
                    done: list[Any] = [await writes[0]]
                except Exception as e:
                    done = [e]
            else:
                done = await asyncio.gather(*writes, return_exceptions=True)
            for (_, at), got in zip(flights.values(), done, strict=True):
                if isinstance(got, BaseException) and not isinstance(got, Exception):
                    raise got
                for n, i in enumerate(at):
                    replies[i] = got if isinstance(got, Exception) else got[n]
            todo = {}
            for i in [i for _, at in flights.values() for i in at]:
                reply = replies[i]
                if isinstance(reply, MovedError):
                    node = cluster.nodes_manager.get_node(host=reply.host, port=reply.port)
                    if node is None:  # a node we have not met: ask the cluster
                        await self._refresh()
                    else:
                        cluster.nodes_manager.slots_cache[reply.slot_id] = [node]
                    todo[i] = None
                elif isinstance(reply, AskError):
                    todo[i] = cluster.nodes_manager.get_node(host=reply.host, port=reply.port)
                elif isinstance(reply, TryAgainError):
                    todo[i] = None
            if not todo:
                break
            if any(isinstance(replies[i], TryAgainError) for i in todo):
                if asyncio.get_running_loop().time() > give_up:
                    break
                await asyncio.sleep(min(0.1, 0.01 * 2**attempt))
        return replies

    async def _on_node(self, node: Any, commands: list[tuple[Any, ...]], *, asking: bool) -> list[Any]:
        """One write to one cluster node, on its line (each command after ASKING when an ASK sent it there);
        a server error is that command's reply. ASKING holds for the next command on its connection only:
        valkey-py's ValkeyCluster sends the two on connections taken from its node's free list one after the
        other, so with two idle connections an ASK never succeeds (ClusterError "TTL exhausted", seen with
        valkey 6.2.0); here the two are one write on one connection."""
        from valkey.exceptions import ResponseError

        if asking:
            commands = [c for command in commands for c in (("ASKING",), command)]
        try:
            line = await self._line(node)
        except Exception:
            self.stale = True  # failed over or gone: learn the slots again before the next flight
            raise
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        line.send(list(zip(commands, futures, strict=True)))
        replies: list[Any] = []
        for future in futures:  # answered in order: after the first, most are done already
            try:
                replies.append(await future)
            except Exception as e:
                replies.append(e)
        lost = [e for e in replies if isinstance(e, Exception) and not isinstance(e, ResponseError)]
        if lost:  # the line failed under them: failed over or gone, so learn the slots again before the next flight
            self.stale = True
            raise lost[0]
        return replies[1::2] if asking else replies

    async def _refresh(self) -> None:
        """Ask the cluster who holds which slots (one CLUSTER SLOTS), once for everyone who needs it now."""
        if self.refreshing is None or self.refreshing.done():
            self.refreshing = asyncio.ensure_future(self.cluster.nodes_manager.initialize())
        await asyncio.shield(self.refreshing)

    async def _do(self, *futures: asyncio.Future[Any]) -> Any:
        """Await replies; connection failures, timeouts and server errors become BackendError."""
        try:
            replies = await futures[0] if len(futures) == 1 else await asyncio.gather(*futures)
        except self.errors as e:
            raise self._failed(e) from e
        if self.outage:
            self._recovered()
        return replies

    # -- keys

    def _keys(self, call_sid: str, *names: str) -> list[str]:
        base = f"{self.prefix}:{{{call_sid}}}:"
        return [base + name for name in names]

    # -- the protocol

    async def ping(self) -> None:
        await self._do(self._send("PING"))

    async def lock(self, call_sid: str, ttl: float) -> str | None:
        token = secrets.token_hex(8)
        (key,) = self._keys(call_sid, "lock")
        taken = await self._do(self._send("SET", key, token, "NX", "PX", max(1, int(ttl * 1000))))
        return token if taken else None

    async def unlock(self, call_sid: str, token: str) -> bool:
        return bool(await self._do(self._script(UNLOCK, self._keys(call_sid, "lock"), [token])))

    async def begin(self, call_sid: str, keys: Sequence[str], ttl: float) -> Snapshot | None:
        token = secrets.token_hex(8)
        args = [token, LEASE_MS, max(1, int(ttl * 1000)), *keys]
        got = await self._do(self._script(BEGIN, self._keys(call_sid, "lock", "s", "c", "v", "r"), args))
        if got is None:
            return None
        blob, served = got[0], got[1]
        found = got[2] if len(got) > 2 else []
        replies = {key: reply_decoder.decode(raw) for key, raw in zip(keys, found, strict=False) if raw is not None}
        return Snapshot(
            token=token,
            session=session_decoder.decode(blob) if blob else None,
            served=[segment_decoder.decode(raw) for raw in served],
            replies=replies,
        )

    async def create(self, call_sid: str, session: Session, ttl: float) -> bool:
        (key,) = self._keys(call_sid, "s")  # one plain command: the call has no other keys yet
        return bool(
            await self._do(self._send("SET", key, encoder.encode(session), "NX", "PX", max(1, int(ttl * 1000))))
        )

    async def commit(
        self, call_sid: str, token: str, session: Session | None, *, turn_changed: bool = False, cancel: str = ""
    ) -> bool:
        current = session.current.id if session is not None and session.current is not None else ""
        args = [
            token,
            encoder.encode(session) if session is not None else b"",
            "1" if turn_changed else "",
            current,
            self.ttl_ms,
            self.channel,
            f"c {self.origin} {cancel}" if cancel else "",
            LEASE_MS,
        ]
        keys = self._keys(call_sid, "lock", "s", "c", "v", "q", "r", "g", "h")
        done = await self._do(self._script(COMMIT, keys, args))
        if done and cancel:
            self._cancel(cancel)
        return bool(done)

    async def push(self, call_sid: str, turn: str, segments: Sequence[Segment], *, fence: int = 1) -> bool:
        args = [turn, self.ttl_ms, self.channel, f"p {self.origin} {call_sid}", fence, *map(encoder.encode, segments)]
        done = await self._do(self._script(PUSH, self._keys(call_sid, "c", "q", "g"), args))
        if done:
            self._wake(call_sid)
        return bool(done)

    async def serve(
        self,
        call_sid: str,
        turn: str,
        keys: Sequence[str],
        segments: Sequence[Segment] | None = None,
        *,
        fence: int = 1,
    ) -> list[Segment] | str:
        given = segments is not None
        args: list[Any] = [turn, self.ttl_ms, len(keys), "1" if given else "", fence, *keys]
        if segments is not None:
            args += map(encoder.encode, segments)
        got = await self._do(self._script(SERVE, self._keys(call_sid, "c", "lock", "q", "v", "r", "g", "h"), args))
        if got == b"superseded":
            return SUPERSEDED
        if got == b"busy":
            return BUSY
        if got == b"orphaned":
            return ORPHANED
        if segments is not None:
            return list(segments) if got == 1 else []
        return [segment_decoder.decode(raw) for raw in got]

    async def renew(self, lease: Lease) -> bool:
        args = [lease.token, lease.turn, lease.fence, LEASE_MS]
        return bool(await self._do(self._script(RENEW, self._keys(lease.call_sid, "lock", "c", "g", "h"), args)))

    async def take_over(self, call_sid: str, turn: str) -> Takeover | None:
        keys = self._keys(call_sid, "c", "g", "h", "s", "v", "q")
        got = await self._do(self._script(TAKE_OVER, keys, [turn, LEASE_MS, self.ttl_ms]))
        if got is None:
            return None
        fence, blob, served = got
        return Takeover(
            fence=int(fence), session=session_decoder.decode(blob), served=[segment_decoder.decode(r) for r in served]
        )

    async def wait(self, call_sid: str, turn: str, timeout: float) -> None:
        event = asyncio.Event()
        waiting = self.waiters.setdefault(call_sid, set())
        waiting.add(event)  # before looking, so a push in between still wakes us
        try:
            current, queued = self._keys(call_sid, "c", "q")
            now, length = await self._do(self._send("GET", current), self._send("LLEN", queued))
            if now != turn.encode() or length:
                return
            if not self.listening:  # no subscription: pushes from other replicas go unheard, so look again soon
                timeout = min(timeout, 0.25)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
        finally:
            waiting.discard(event)
            if not waiting and self.waiters.get(call_sid) is waiting:
                del self.waiters[call_sid]

    async def reply(self, call_sid: str, key: str) -> tuple[str, list[Segment]] | None:
        (replies,) = self._keys(call_sid, "r")
        raw = await self._do(self._send("HGET", replies, key))
        return reply_decoder.decode(raw) if raw is not None else None

    def on_cancel(self, callback: Callable[[str], None]) -> None:
        self.cancel_callbacks.append(callback)

    async def put_blob(self, key: str, data: bytes, ttl: float) -> None:
        await self._do(self._send("SET", f"{self.prefix}:blob:{key}", data, "PX", max(1, int(ttl * 1000))))

    async def get_blob(self, key: str) -> bytes | None:
        return await self._do(self._send("GET", f"{self.prefix}:blob:{key}"))

    # -- pub/sub: one subscription per process

    def _cancel(self, turn: str) -> None:
        for callback in self.cancel_callbacks:
            try:
                callback(turn)
            except Exception:
                log.exception("cancel callback failed", extra={"turn": turn})

    def _wake(self, call_sid: str) -> None:
        for event in self.waiters.get(call_sid, ()):
            event.set()

    def _dispatch(self, data: bytes) -> None:
        kind, origin, what = (data.decode(errors="replace").split(" ", 2) + ["", ""])[:3]
        if origin == self.origin:
            return  # handled locally when it happened
        if kind == "c":
            self._cancel(what)
        elif kind == "p":
            self._wake(what)

    async def _subscriber(self) -> Any:
        """The client to subscribe with: the pool's (the node VALKEY_URL names); on a cluster, each resubscription
        after a failure takes the next node the request path knows of. PUBLISH reaches every node's subscribers
        over the cluster bus, so one subscription per process hears every replica (sharded pub/sub would need a
        subscription per call, confirmed before each /continue looks at its queue: a round trip more)."""
        if self.is_cluster is None:  # not asked yet (a cluster is made as soon as it is known)
            await self._connect()
        nodes = self.cluster.get_nodes() if self.cluster is not None else []  # as the request path last saw them
        turn, self.listen_turn = self.listen_turn, self.listen_turn + 1
        if not nodes or turn == 0:
            return self.client  # the node VALKEY_URL names
        import valkey.asyncio as valkey

        node = nodes[turn % len(nodes)]
        pool = valkey.ConnectionPool(connection_class=node.connection_class, **node.connection_kwargs)
        return valkey.Valkey(connection_pool=pool)

    async def _listen_forever(self, ping_every: float = 5.0) -> None:
        """Keep one subscription to the events channel alive; resubscribe after any failure."""
        from valkey.exceptions import ConnectionError

        backoff = 0.05
        while True:
            client, pubsub = self.client, None
            try:
                client = await self._subscriber()
                pubsub = client.pubsub()
                await pubsub.subscribe(self.channel)
                heard = time.monotonic()
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    now = time.monotonic()
                    if message is not None:
                        heard = now
                        if message["type"] == "message":
                            self._dispatch(message["data"])
                        elif message["type"] == "subscribe":
                            self.listening, backoff = True, 0.05
                            self.subscribed.set()
                            if self.outage:
                                self._recovered()
                    elif now - heard > 3 * ping_every:  # pings went unanswered: the connection is dead
                        raise ConnectionError("the subscription stopped answering")
                    elif now - heard > ping_every:
                        await pubsub.ping()
            except self.errors as e:
                self._failed(e)
            except Exception:
                log.exception("valkey subscription failed")
            finally:
                self.listening = False
                self.subscribed.clear()
                for waiting in self.waiters.values():  # they look again instead of sleeping through a push
                    for event in waiting:
                        event.set()
                with contextlib.suppress(Exception):
                    if pubsub is not None:
                        await asyncio.shield(pubsub.aclose())
                    if client is not self.client:
                        await asyncio.shield(client.aclose(close_connection_pool=True))
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)


@hookimpl
def register_session_backends(register: Register) -> None:
    register("valkey", ValkeyBackend)
