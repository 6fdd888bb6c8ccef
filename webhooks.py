"""The HTTP edge: the signature check, the request gate (webhooks and socket upgrades), /health and /metrics.

Every webhook is a raw ASGI route handler (parse, verify, answer), so the hot path stays lean
(DESIGN.md, "Performance notes"): one log line, metrics bound once, TwiML from small templates.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import unquote_to_bytes

import msgspec
from litestar import Litestar, Request, Response, asgi
from litestar.types import ExceptionHandlersMap
from prometheus_client.exposition import choose_encoder

from contract import VERSION, BackendError, SessionBackend, Settings, TwilioForm, log
from deadlines import within
from observe import Observer, note, request_fields, request_line
from twiml import document, esc, gather_tag

# ----------------------------------------------------------------------------- signatures


def twilio_signature(token: str, url: str, params: Sequence[tuple[str, str]]) -> str:
    """Twilio's X-Twilio-Signature: base64 HMAC-SHA1 of the URL plus the params sorted by name, then value.

    Repeated names contribute each distinct value once, which is what sorting the distinct pairs gives."""
    data = url + signed_params(params)
    return base64.b64encode(hmac.new(token.encode(), data.encode(), hashlib.sha1).digest()).decode()


def signed_params(params: Sequence[tuple[str, str]]) -> str:
    """The params as Twilio signs them: each distinct (name, value) pair, sorted, concatenated."""
    return "".join([key + value for key, value in sorted(set(params))])


_PORT = re.compile(r":\d+$")
_HOST = re.compile(rb"\A[0-9A-Za-z!$&'()*+,;=\-._~:\[\]@%]*\Z")
DEFAULT_PORTS = {"https": "443", "wss": "443", "http": "80", "ws": "80"}


def url_variants(url: str) -> list[str]:
    """The URL as given, without its port, and with the scheme's default port (Twilio signs either)."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hostport = netloc.rpartition("@")
    head = f"{scheme}{sep}{userinfo}{at}"
    if _PORT.search(hostport):
        variants = [url, head + _PORT.sub("", hostport) + slash + tail]
    else:
        variants = [url, f"{head}{hostport}:{DEFAULT_PORTS.get(scheme, '80')}{slash}{tail}"]
    if "'" in url or "%27" in url:  # Twilio has signed both spellings of an apostrophe
        variants += [v.replace("'", "%27") if "'" in v else v.replace("%27", "'") for v in variants]
    return variants


class Signer:
    """Checks X-Twilio-Signature against the URL Twilio requested (not the URL we were reached at)."""

    def __init__(self, settings: Settings) -> None:
        self.token = settings.twilio_auth_token
        self.public = settings.public_url.rstrip("/")
        trusted = settings.trusted_proxies
        self.trust_all = "*" in trusted
        self.proxies = [ipaddress.ip_network(p, strict=False) for p in trusted if p != "*"]
        self.known: dict[str, bool] = {}
        self.mac = hmac.new(self.token.encode(), digestmod=hashlib.sha1)  # keyed once; each check copies it
        self.variants: dict[str, list[str]] = {}  # URL -> the spellings Twilio may have signed (a few URLs recur)

    def _trusted(self, client: tuple[str, int] | None) -> bool:
        if self.trust_all or client is None:
            return self.trust_all
        if (known := self.known.get(client[0])) is None:
            try:
                addr = ipaddress.ip_address(client[0])
                known = any(addr in net for net in self.proxies)
            except ValueError:
                known = False
            if len(self.known) < 4096:  # the peers are a few proxies; a flood of addresses is not remembered
                self.known[client[0]] = known
        return known

    def base(self, scope: Scope, headers: Mapping[bytes, bytes]) -> str:
        """The public base URL Twilio called: PUBLIC_URL, or the trusted proxy's scheme and host, or our own."""
        ws = scope["type"] == "websocket"
        if self.public:
            if ws:
                return self.public.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
            return self.public
        if not _HOST.match(raw_host := headers.get(b"host", b"")):  # as Litestar's router checks it
            raise Reject(400, "invalid Host header")
        scheme, host = scope["scheme"], raw_host.decode("latin-1")
        if self._trusted(scope.get("client")):
            if proto := headers.get(b"x-forwarded-proto"):
                scheme = proto.decode("latin-1").split(",")[0].strip()
                scheme = {"https": "wss", "http": "ws"}.get(scheme, scheme) if ws else scheme
            if fwd_host := headers.get(b"x-forwarded-host"):
                host = fwd_host.decode("latin-1").split(",")[0].strip()
        return f"{scheme}://{host}"

    @staticmethod
    def target(scope: Scope) -> str:
        """The request target as Twilio sent it: the raw (still percent-encoded) path and the query."""
        raw = scope.get("raw_path") or scope["path"].encode()
        target = raw.partition(b"?")[0].decode("latin-1")
        if query := scope.get("query_string"):
            target += "?" + query.decode("latin-1")
        return target

    def url(self, scope: Scope, headers: Mapping[bytes, bytes]) -> str:
        """The URL Twilio signed: the public base plus the raw target."""
        return self.base(scope, headers) + self.target(scope)

    def check(self, url: str, params: Sequence[tuple[str, str]], signature: str) -> bool:
        """Compare in constant time against each URL variant Twilio may have signed."""
        given = signature.encode()  # bytes: a header with non-ASCII characters is just a wrong signature
        if (variants := self.variants.get(url)) is None:
            variants = url_variants(url)
            if len(self.variants) < 1024:  # the public URL's few paths; a flood of Host headers is not remembered
                self.variants[url] = variants
        tail = signed_params(params)
        for variant in variants:
            mac = self.mac.copy()
            mac.update((variant + tail).encode())
            if hmac.compare_digest(binascii.b2a_base64(mac.digest(), newline=False), given):
                return True
        return False


# ----------------------------------------------------------------------------- routes


class Reject(Exception):
    """A request we refuse with a 4xx and one log line."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


# A Twilio call's id (CallSid: CA + 32 hex digits; tests use others); never "BR": the browser phone's own
# calls (BROWSER_SID, assigned by the server) stay out of reach of every Twilio route and media socket.
CALL_SID = re.compile(r"(?!BR)[A-Za-z0-9_-]{2,64}")
BROWSER_SID = re.compile(r"BR[0-9a-f]{32}")
# ASGI as the raw handlers use it: plain dicts (Litestar's TypedDicts tell HTTP and WebSocket events apart
# only by their "type", which a handler checks at run time anyway)
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

MISMATCH_HINT = "set PUBLIC_URL to the exact base URL Twilio calls (as in the Twilio console)"


def parse_form(data: bytes) -> list[tuple[str, str]]:
    """An application/x-www-form-urlencoded body as (name, value) pairs, empty values kept.

    The same result as urllib's parse_qsl with keep_blank_values and strict UTF-8, in a third of the time:
    only what holds a percent sign is unquoted, and straight to bytes."""
    if not data:
        return []
    pairs = []
    for part in data.decode().split("&"):
        if part:
            if "+" in part:
                part = part.replace("+", " ")
            name, _, value = part.partition("=")
            if "%" in value:  # (a phone number's "+" is the one escape in most of Twilio's fields)
                if value.count("%") == value.count("%2B"):
                    value = value.replace("%2B", "+")
                else:
                    value = unquote_to_bytes(value).decode()
            if "%" in name:
                name = unquote_to_bytes(name).decode()
            pairs.append((name, value))
    return pairs


async def read_body(receive: Receive, limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise Reject(413, f"body over {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def respond(send: Send, status: int, body: bytes, content_type: bytes = b"text/xml") -> None:
    """Send a complete response."""
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def socket_url(base_url: str, path: str) -> str:
    """The WebSocket URL Twilio should open at `path` of the public base URL (wss for https); no query string,
    which a socket URL may not carry (what it needs travels as <Parameter>s)."""
    scheme, _, host = base_url.partition("://")
    return f"{'wss' if scheme == 'https' else 'ws'}://{host}{path}"


async def refuse_upgrade(send: Send, route: str) -> None:
    """A WebSocket upgrade on a plain HTTP route: refuse it (the server answers 403) with one log line."""
    await send({"type": "websocket.close", "code": 1008})
    log.info("request", extra={"route": route, "status": 403, "error": "websocket upgrade on an HTTP route"})


class Gate:
    """Reads a Twilio request (size, content type, signature, then the form fields) or checks a socket's upgrade."""

    def __init__(self, settings: Settings, obs: Observer) -> None:
        self.settings, self.obs = settings, obs
        self.signer = Signer(settings)
        self.unsigned = not settings.twilio_auth_token and settings.allow_unsigned

    async def open(self, scope: Scope, receive: Receive) -> tuple[TwilioForm, str, dict[str, str]]:
        """Return the form, the public base URL and the query; raise Reject for anything wrong.

        An unsigned request is refused before its body is read; a signed one is parsed only as far as
        the signature needs (the body's fields) until the signature matches."""
        headers = dict(scope["headers"])
        method = scope["method"]
        if method not in ("GET", "POST"):
            raise Reject(405, f"method {method} not allowed")
        if method == "POST" and not headers.get(b"content-type", b"").startswith(b"application/x-www-form-urlencoded"):
            raise Reject(415, "expected application/x-www-form-urlencoded")
        signature = headers.get(b"x-twilio-signature", b"").decode("latin-1")
        if not signature and not self.unsigned:
            raise Reject(403, "missing X-Twilio-Signature")
        body = await read_body(receive, self.settings.max_body_bytes)
        base = self.signer.base(scope, headers)
        url = base + self.signer.target(scope)
        try:
            params = parse_form(body) if method == "POST" else []
        except UnicodeDecodeError:
            raise Reject(400, "body is not UTF-8") from None
        if not self.unsigned and not self.signer.check(url, params, signature):  # said on the request's one line
            note(checked_url=url, hint=MISMATCH_HINT)
            raise Reject(403, "signature mismatch")
        try:
            query = dict(parse_form(scope["query_string"]))
        except UnicodeDecodeError:
            raise Reject(400, "query string is not UTF-8") from None
        fields = dict(params) if method == "POST" else dict(query)
        if fields.get("Confidence") == "":
            del fields["Confidence"]
        try:
            form = msgspec.convert(fields, TwilioForm, strict=False)
        except msgspec.ValidationError as e:
            raise Reject(400, f"bad field: {e}") from None
        if not CALL_SID.fullmatch(form.call_sid):
            raise Reject(400, "missing or malformed CallSid")
        return form, base, query

    async def upgrade(self, scope: Scope, receive: Receive, send: Send, route: str) -> bool:
        """Accept a Twilio WebSocket upgrade signed for its wss:// URL; refuse any other (a 403) with one log line."""
        if scope["type"] != "websocket":
            await respond(send, 426, b"426 this route takes WebSocket upgrades only\n", b"text/plain")
            log.info("request", extra={"route": route, "status": 426})
            return False
        if (await receive())["type"] != "websocket.connect":
            return False
        headers = dict(scope["headers"])
        signature = headers.get(b"x-twilio-signature", b"").decode("latin-1")
        try:
            url = self.signer.url(scope, headers)
        except Reject as r:
            url, why = "", str(r)
        else:
            why = (
                ""
                if self.unsigned or (signature and self.signer.check(url, [], signature))
                else ("signature mismatch" if signature else "missing X-Twilio-Signature")
            )
        if why:
            log.warning(why, extra={"route": route, "checked_url": url, "hint": MISMATCH_HINT})
            await send({"type": "websocket.close", "code": 1008})  # before accept: the upgrade gets a 403
            return False
        await send({"type": "websocket.accept"})
        return True


def webhook(path: str, gate: Gate, handle: Callable[[TwilioForm, str, dict[str, str]], Awaitable[bytes]]) -> Any:
    """A Twilio webhook route in raw ASGI: the hot path stays lean (see DESIGN.md).

    Whatever goes wrong inside, Twilio gets a document: the apology in a <Gather>, never a 500."""
    budget = 9.5  # seconds: well inside Twilio's 15 s, whatever the model or the backend does
    settings, obs = gate.settings, gate.obs
    fallback = document(f"{gather_tag(settings)}<Say>{esc(settings.apology)}</Say></Gather>")
    answered = obs.route(path)  # this route's metrics, bound once

    @asgi(path, copy_scope=False, name=path)
    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await refuse_upgrade(send, path)
        t0 = time.perf_counter()
        status, body, ctype = 200, fallback, b"text/xml"
        fields: dict[str, Any] = {"route": path, "status": 200, "call": ""}
        context = request_fields.set(fields)
        try:
            form, base_url, query = await gate.open(scope, receive)
            fields["call"] = form.call_sid
            async with within(budget):
                body = await handle(form, base_url, query)
        except Reject as r:
            status, body, ctype = r.status, f"{r.status} {r}\n".encode(), b"text/plain"
            fields["error"] = str(r)  # the request's one line says why it was refused
        except TimeoutError:
            log.error("response budget exceeded", extra={"route": path, "call": fields["call"]})
        except BackendError as e:
            obs.backend_errors.inc()
            fields["error"] = "session backend unavailable"  # the request's line says so; the cause is logged once
            if not e.reported:
                log.error("session backend unavailable", extra={"route": path, "call": fields["call"], "error": str(e)})
        except Exception:
            log.exception("request failed", extra={"route": path, "call": fields["call"]})
        finally:
            request_fields.reset(context)
        await respond(send, status, body, ctype)
        fields["status"], fields["ms"] = status, round((time.perf_counter() - t0) * 1000, 2)
        if "hint" in fields:
            log.warning("request", extra=fields)
        else:
            request_line(fields)
        answered(fields)

    return endpoint


class Switchboard(Litestar):
    """The app: Twilio's webhooks are answered before Litestar's router, everything else goes through it.

    For a webhook, the router's trie walk, scope state and exception-handler lookup cost about as much
    as the signature check. Only exact webhook paths over HTTP take the short way; another path, a
    trailing slash, a root path or a WebSocket still goes through Litestar.

    The short way skips Litestar's middleware too, Sentry's included: middleware added to this app
    sees /health, /metrics, /audio and the sockets, never a webhook. To wrap the webhooks as well,
    wrap the whole ASGI app (middleware around create_app()'s result), or do the work in `webhook()`."""

    direct: Mapping[str, Callable[..., Any]] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (
            scope["type"] == "http"
            and (fn := self.direct.get(scope["path"])) is not None
            and not scope.get("root_path")
        ):
            return await fn(scope, receive, send)
        return await super().__call__(scope, receive, send)

    def answer_directly(self, handlers: Sequence[Any]) -> None:
        """Take these raw ASGI route handlers' exact paths the short way."""
        self.direct = {path: h.fn for h in handlers for path in h.paths}


def unrouted() -> ExceptionHandlersMap:
    """What the router refuses before any route (an unknown path, a malformed Host): a short 4xx and one log line."""

    def refused(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
        status, why = getattr(exc, "status_code", 400), str(getattr(exc, "detail", "") or "bad request").lower()
        path = request.scope.get("raw_path", b"")[:200].decode("latin-1").encode("unicode_escape").decode()
        log.info("request", extra={"route": "", "status": status, "error": why, "path": path})  # escaped: one line
        return Response(f"{status} {why}\n".encode(), status_code=status, media_type="text/plain")

    return {400: refused, 404: refused, 405: refused}


def health(
    settings: Settings, backend: SessionBackend, draining: Callable[[], bool], plugins: Mapping[str, Any]
) -> Any:
    """GET /health: 200 while the session backend answers, 503 when it does not or the process is draining."""

    @asgi("/health", copy_scope=False, name="health")
    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await refuse_upgrade(send, "/health")
        try:
            await backend.ping()
            status, state = (503, "draining") if draining() else (200, "ok")
        except Exception as e:  # any failure to reach the backend is "unavailable"; the error is logged (once)
            if not (isinstance(e, BackendError) and e.reported):
                log.warning("health check failed", extra={"error": f"{type(e).__name__}: {e}"})
            status, state = 503, "unavailable"
        body = msgspec.json.encode({"status": state, "version": VERSION, "mode": settings.mode, "plugins": plugins})
        await respond(send, status, body, b"application/json")

    return endpoint


def metrics(obs: Observer) -> Any:
    """GET /metrics in Prometheus' text format; with METRICS_TOKEN set, only for `Bearer <token>`."""
    expected = b"Bearer " + obs.settings.get("METRICS_TOKEN").encode()
    protected = expected != b"Bearer "
    registry = obs.registry

    @asgi("/metrics", copy_scope=False, name="metrics")
    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await refuse_upgrade(send, "/metrics")
        headers = dict(scope["headers"])
        if scope["method"] not in ("GET", "HEAD"):
            await respond(send, 405, b"405 method not allowed\n", b"text/plain")
            log.info("request", extra={"route": "/metrics", "status": 405})
        elif protected and not hmac.compare_digest(headers.get(b"authorization", b""), expected):
            body = b"401 set Authorization: Bearer <METRICS_TOKEN>\n"
            await send(
                {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [
                        (b"content-type", b"text/plain"),
                        (b"content-length", str(len(body)).encode()),
                        (b"www-authenticate", b'Bearer realm="metrics"'),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            log.info("request", extra={"route": "/metrics", "status": 401})
        else:
            encode, content_type = choose_encoder(headers.get(b"accept", b"").decode("latin-1"))
            await respond(send, 200, encode(registry), content_type.encode())

    return endpoint
