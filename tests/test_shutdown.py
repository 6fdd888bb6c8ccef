"""Graceful redeploys: SIGTERM lets in-flight turns finish with valid TwiML, then the process exits 0."""

from __future__ import annotations

import signal
import threading
import time
import xml.etree.ElementTree as ET

from conftest import TOKEN, env, running, server

import main
import phone


def test_sigterm_lets_a_slow_turn_finish_and_exits_cleanly() -> None:
    with server({"ECHO_FIRST_TOKEN_MS": "1500", "ECHO_TOKEN_MS": "200", "DRAIN_SECONDS": "5"}) as (
        base,
        proc,
        log_path,
    ):
        call = phone.Phone(base, TOKEN, out=lambda _: None)
        call.post("/voice")
        answers: list[bytes] = []
        turn = threading.Thread(
            target=lambda: answers.append(
                call.post(
                    "/process-speech", {"SpeechResult": "Opening hours. And prices too", "Confidence": "0.9"}
                ).content
            )
        )
        turn.start()
        time.sleep(0.4)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        turn.join(10)
        code = proc.wait(15)
        exited_after = time.monotonic() - t0
        call.http.close()
    root = ET.fromstring(answers[0])
    assert [(el.tag, el.text) for el in root if el.tag == "Say"] == [("Say", "You said: Opening hours.")]
    assert code == 0 and exited_after < 8
    text = log_path.read_text()
    assert "SIGTERM: draining" in text and "switchboard stopped" in text
    assert text.index("turn generated") < text.index("switchboard stopped")  # the reply finished generating first


async def test_health_reports_draining() -> None:
    app = main.create_app(env())
    async with running(app) as client:
        app.state.calls.draining = True
        response = await client.get("/health")
    assert (response.status_code, response.json()["status"]) == (503, "draining")
