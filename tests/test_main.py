"""main: create_app's startup checks, plugin loading by name and entry point, and /status in any mode."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest
from conftest import ROOT, TOKEN, Captured, Scripted, Twilio, env, plugin, running

import main
import phone

# ----------------------------------------------------------------------------- startup


def test_server_refuses_to_start_without_an_auth_token() -> None:
    with pytest.raises(main.ConfigError, match="TWILIO_AUTH_TOKEN is not set"):
        main.create_app({})


def test_allow_unsigned_is_loud(logs: Captured) -> None:
    main.create_app({"ALLOW_UNSIGNED": "1"})
    assert any("ALLOW_UNSIGNED=1" in line and line.startswith("warning") for line in logs.lines)


def test_memory_backend_with_several_workers_is_refused() -> None:
    with pytest.raises(main.ConfigError, match="WEB_CONCURRENCY=4 with SESSION_BACKEND=memory"):
        main.create_app(env(WEB_CONCURRENCY="4"))


# ----------------------------------------------------------------------------- plugins


def test_unknown_plugin_names_fail_with_the_list_of_what_exists() -> None:
    with pytest.raises(main.ConfigError) as e:
        main.create_app(env(LLM_PROVIDER="opnai"))
    names = sorted(main.registered(main.plugin_manager(), "llm"))
    assert str(e.value) == f"LLM_PROVIDER='opnai' is not registered; available: {', '.join(names)}"
    with pytest.raises(main.ConfigError, match="TTS_VOICE='robot' is not registered; available: .*say"):
        main.create_app(env(TTS_VOICE="robot"))
    with pytest.raises(main.ConfigError, match="SESSION_BACKEND='disk' is not registered; available: .*memory"):
        main.create_app(env(SESSION_BACKEND="disk"))


def test_two_plugins_registering_one_name_is_an_error_naming_both() -> None:
    echo_again = plugin(llm=[Scripted("echo")])
    with pytest.raises(main.ConfigError, match="llm 'echo' is registered twice: by conftest and by plugins.llm_echo"):
        main.create_app(env(), plugins=[echo_again])


def test_a_misspelled_hook_is_an_error() -> None:
    class Typo:
        @main.hookimpl
        def register_llm_provider(self, register: Any) -> None: ...

    with pytest.raises(Exception, match="register_llm_provider"):
        main.create_app(env(), plugins=[Typo()])


def test_entry_point_plugins_are_discovered(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sb_parrot.py").write_text(
        "from main import LLMProvider, hookimpl\n"
        "class Parrot(LLMProvider):  # a protocol subclass: it inherits the optional capabilities\n"
        "    name = 'parrot'\n"
        "    def __init__(self, settings): self.settings = settings\n"
        "@hookimpl\n"
        "def register_llm_providers(register):\n"
        "    register('parrot', Parrot)\n"
    )
    dist = tmp_path / "sb_parrot-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sb-parrot\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[switchboard]\nparrot = sb_parrot\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    app = main.create_app(env(LLM_PROVIDER="parrot,echo"))
    assert [p.name for p in app.state.calls.llm.providers] == ["parrot", "echo"]


def test_unselected_plugins_build_nothing() -> None:
    built: list[str] = []

    class Counting:
        @main.hookimpl
        def register_llm_providers(self, register: Any) -> None:
            register("never", lambda settings: built.append("never"))

    main.create_app(env(), plugins=[Counting()])
    assert built == []


# ----------------------------------------------------------------------------- /status


async def test_status_callbacks_end_the_session_only_when_the_call_is_over() -> None:
    app = main.create_app(env())
    async with running(app) as client:
        twilio = Twilio(client)
        await twilio.call()
        await twilio.post("/status", CallStatus="ringing")
        still = twilio.call_sid in app.state.calls.backend.calls
        await twilio.post("/status", CallStatus="no-answer")
    assert still and twilio.call_sid not in app.state.calls.backend.calls


def test_python_main_py_serves_the_app_with_no_alias_for_plugins() -> None:
    """`python main.py` runs this file as __main__; plugins' `from main import ...` load it again as `main`,
    which works because the contract they share lives in contract.py."""
    port = phone.free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py")],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PORT": str(port), "TWILIO_AUTH_TOKEN": TOKEN},
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, (
                    process.stderr.read() if process.stderr else ""
                )
                time.sleep(0.1)
        assert health.status_code == 200
        assert health.json()["plugins"] == {"llm": ["echo"], "tts": "say", "session": "memory"}
    finally:
        process.terminate()
        process.communicate(timeout=15)
