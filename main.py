"""switchboard: a phone voice agent for Twilio. This module loads the plugins and composes the app.

Twilio calls /voice; the mode (MODE, or ?mode= on the number's voice URL) answers it and owns the
call's further routes. Everything that talks to a vendor is a pluggy plugin chosen by name from the
environment. The contract every plugin imports (settings, structs, protocols, hookspecs) lives in
contract.py and is re-exported here, so plugins write `from main import hookimpl, Settings, ...`.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pluggy
from litestar import Litestar

import audio
import observe
from browser import BrowserPhone
from calls import Calls, LLMChain, Mode
from contract import *  # noqa: F403  (the contract, for plugins: `from main import hookimpl, ...`)
from contract import (
    KINDS,
    TERMINAL_STATUSES,
    VERSION,
    ConfigError,
    Hookspecs,
    Settings,
    TwilioForm,
    load_settings,
    log,
)
from gather import Gather
from media import MediaMode
from pcm import FRAME, energy_db, pcm16_to_ulaw, ulaw_to_pcm16  # noqa: F401  (for plugins: `from main import ...`)
from relay import Relay
from twiml import document
from webhooks import Gate, Reject, Switchboard, health, metrics, unrouted, webhook

HERE = Path(__file__).resolve().parent

modes: dict[str, Callable[[Calls], Mode]] = {
    "gather": Gather,
    "relay": Relay,
    "media": MediaMode,
}  # a new call mode is one entry


# ----------------------------------------------------------------------------- plugins


def plugin_manager(extra: Sequence[object] = ()) -> pluggy.PluginManager:
    """Load plugins/*.py (sorted), entry points in group `switchboard`, and `extra` objects."""
    pm = pluggy.PluginManager("switchboard")
    pm.add_hookspecs(Hookspecs)
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    for path in sorted((HERE / "plugins").glob("*.py")):
        if not path.stem.startswith("_"):
            pm.register(importlib.import_module(f"plugins.{path.stem}"), name=f"plugins.{path.stem}")
    pm.load_setuptools_entrypoints("switchboard")
    for plugin in extra:
        pm.register(plugin)
    pm.check_pending()
    return pm


def registered(pm: pluggy.PluginManager, kind: str) -> dict[str, Callable[[Settings], Any]]:
    """Collect one kind's factories by name; two plugins claiming one name is an error naming both."""
    found: dict[str, Callable[[Settings], Any]] = {}

    def register(name: str, factory: Callable[[Settings], Any]) -> None:
        if name in found:
            first, second = sorted([found[name].__module__, factory.__module__])
            raise ConfigError(f"{kind} {name!r} is registered twice: by {first} and by {second}")
        found[name] = factory

    getattr(pm.hook, KINDS[kind][0])(register=register)
    return found


def select(pm: pluggy.PluginManager, kind: str, names: Sequence[str], settings: Settings) -> list[Any]:
    """Build the selected plugins of one kind, or fail with a sentence that lists what exists."""
    found = registered(pm, kind)
    for name in names:
        if name not in found:
            var = KINDS[kind][1]
            raise ConfigError(f"{var}={name!r} is not registered; available: {', '.join(sorted(found))}")
    return [found[name](settings) for name in names]


# ----------------------------------------------------------------------------- the app


def voice(settings: Settings, by_name: Mapping[str, Mode]) -> Callable[[TwilioForm, str, dict[str, str]], Any]:
    """POST /voice: the call's mode (?mode= on the number's voice URL, else MODE) answers it."""

    async def answer(form: TwilioForm, base_url: str, query: dict[str, str]) -> bytes:
        name = query.get("mode") or settings.mode
        if (mode := by_name.get(name)) is None:
            *others, last = by_name
            raise Reject(400, f"mode={name!r} on the voice URL must be {', '.join(others)} or {last}")
        return await mode.voice(form, base_url, query)

    return answer


def status(calls: Calls) -> Callable[[TwilioForm, str, dict[str, str]], Any]:
    """POST /status: Twilio's status callback; a finished call ends its session at once, in any mode."""

    async def answer(form: TwilioForm, base_url: str, query: dict[str, str]) -> bytes:
        if form.call_status in TERMINAL_STATUSES:
            await calls.end_call(form.call_sid, form.call_status)
        return document("")

    return answer


def create_app(environ: Mapping[str, str] | None = None, *, plugins: Sequence[object] = ()) -> Litestar:
    """Build the ASGI app from env vars (os.environ when none are given) and the installed plugins."""
    settings = load_settings(os.environ if environ is None else environ)  # the one place the environment is read
    observe.setup_logging(settings)
    if settings.mode not in modes:
        raise ConfigError(f"MODE={settings.mode!r} is not valid: use one of {', '.join(modes)}")
    if not settings.twilio_auth_token:
        if not settings.allow_unsigned:
            raise ConfigError(
                "TWILIO_AUTH_TOKEN is not set: copy the Auth Token from the Twilio console "
                "(Account info) into TWILIO_AUTH_TOKEN. For local experiments only, ALLOW_UNSIGNED=1 skips the check."
            )
        log.warning("ALLOW_UNSIGNED=1: Twilio signatures are NOT checked; anyone can drive this agent")
    if settings.web_concurrency > 1 and settings.session_backend == "memory":
        raise ConfigError(
            f"WEB_CONCURRENCY={settings.web_concurrency} with SESSION_BACKEND=memory would split calls across "
            "processes; use SESSION_BACKEND=valkey (with VALKEY_URL or REDIS_URL) or one worker."
        )
    pm = plugin_manager(plugins)
    providers = select(pm, "llm", settings.llm_provider, settings)
    voice_plugin = select(pm, "tts", [settings.tts_voice], settings)[0]
    backend = select(pm, "session", [settings.session_backend], settings)[0]
    speaker = audio.host(voice_plugin, backend, settings)  # a voice that synthesises audio is spoken with <Play>
    tool_names = () if settings.tools == ("none",) else settings.tools
    tools = [tool for tool in select(pm, "tool", tool_names, settings) if tool is not None]
    recorder_names = () if settings.call_recorders == ("none",) else settings.call_recorders
    recorders = select(pm, "recorder", recorder_names, settings)
    speech = select(pm, "speech", [settings.speech_model], settings)[0]
    obs = observe.Observer(settings, providers, recorders, [speech])
    calls = Calls(settings, LLMChain(providers, settings, obs), speaker, backend, obs, tools, speech)
    by_name = {name: make(calls) for name, make in modes.items()}
    chosen = {"llm": list(settings.llm_provider), "tts": settings.tts_voice, "session": settings.session_backend}

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        opened: list[Any] = []
        try:
            for obj in (backend, speaker, *providers, *recorders, speech):
                await obj.aopen()
                opened.append(obj)
            calls.watch_for_sigterm()
            log.info("switchboard ready", extra={"version": VERSION, "mode": settings.mode, **chosen})
            gc.collect()
            gc.freeze()  # startup objects never die: keep them out of every collection (shorter GC pauses)
            yield
        finally:
            await calls.drain()  # the server stopped taking requests; let replies being generated finish
            for obj in reversed(opened):
                try:
                    await obj.aclose()
                except Exception:
                    log.exception("closing a plugin failed", extra={"plugin": type(obj).__name__})
            log.info("switchboard stopped")

    observe.start_sentry(settings)  # before Litestar(): its integration hooks the app's construction
    gate = Gate(settings, obs)
    twilio = [
        webhook("/voice", gate, voice(settings, by_name)),
        webhook("/status", gate, status(calls)),
        *(route for mode in by_name.values() for route in mode.routes(gate)),
    ]
    media = by_name["media"]
    assert isinstance(media, MediaMode)
    browser = BrowserPhone(calls, media).routes() if settings.browser_phone_token else []  # off: /phone is a 404
    app = Switchboard(
        [
            *twilio,
            *browser,
            health(settings, backend, lambda: calls.draining, chosen),
            audio.route(speaker, backend),
            metrics(obs),
        ],
        lifespan=[lifespan],
        openapi_config=None,
        logging_config=None,
        debug=False,
        exception_handlers=unrouted(),
    )
    app.answer_directly(twilio)  # Twilio's requests skip the router (it costs as much as the signature check)
    app.state.calls = calls
    app.state.modes = by_name
    app.state.settings = settings
    return app


if __name__ == "__main__":  # `python main.py`: the app on PORT (8000), as the Procfile runs it
    import uvicorn

    uvicorn.run("main:create_app", factory=True, host="0.0.0.0", port=int(os.environ.get("PORT") or 8000))
