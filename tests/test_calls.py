"""What every call mode shares: turn ids that carry their age, sessions, history bounded by MAX_TURNS."""

from __future__ import annotations

from conftest import Scripted, Twilio, env, listening, running, scripted_app, tree

import calls
import main


def test_turn_ids_carry_their_age() -> None:
    turn = calls.new_turn_id()
    assert 0 <= calls.turn_age(turn) < 1
    assert calls.turn_age("zz") == float("inf")


async def test_an_unknown_call_starts_a_fresh_session_and_carries_on() -> None:
    app = main.create_app(env())
    async with running(app) as client:
        twilio = Twilio(client)  # never called /voice, as after a restart
        answer = await twilio.say("are you still there")
    assert tree(answer.content) == listening("You said: are you still there.")
    assert twilio.call_sid in app.state.calls.backend.calls


async def test_history_sent_to_the_model_is_system_plus_the_last_max_turns() -> None:
    model = Scripted(replies=["First answer.", "Second answer.", "Third answer.", "Fourth answer."])
    app = scripted_app(model, MAX_TURNS="2")
    async with running(app) as client:
        twilio = Twilio(client)
        await twilio.call()
        for text in ["one", "two", "three", "four"]:
            assert await twilio.turn(text) == [
                f"{['First', 'Second', 'Third', 'Fourth'][['one', 'two', 'three', 'four'].index(text)]} answer."
            ]
    sent = [(m.role, m.content) for m in model.calls[-1]]
    assert sent == [
        ("user", "two"),
        ("assistant", "Second answer."),
        ("user", "three"),
        ("assistant", "Third answer."),
        ("user", "four"),
    ]
