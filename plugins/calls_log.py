"""The default call recorder: one structured log line per finished call, the caller's number masked."""

from __future__ import annotations

from main import CallRecord, CallRecorder, Register, Settings, TurnRecord, hookimpl, log, mask


class LogRecorder(CallRecorder):
    """Logs `call record` with the call's outcome, length, turns, models, tokens, cost and mean latencies."""

    def __init__(self, settings: Settings) -> None:
        # per call until it ends: the sum and count of its first-audio waits (numbers: nothing for the GC to scan)
        self.first_audio: dict[str, tuple[float, int]] = {}

    def turn_finished(self, record: TurnRecord) -> None:
        if record.first_audio_ms is not None:
            total, n = self.first_audio.get(record.call_sid, (0.0, 0))
            self.first_audio[record.call_sid] = (total + record.first_audio_ms, n + 1)
            if len(self.first_audio) > 10_000:  # calls that never got a status callback
                del self.first_audio[next(iter(self.first_audio))]

    def call_finished(self, record: CallRecord) -> None:
        total, n = self.first_audio.pop(record.call_sid, (0.0, 0))
        log.info(
            "call record",
            extra={
                "call": record.call_sid,
                "caller": mask(record.caller),
                "to": mask(record.to),
                "outcome": record.outcome,
                "seconds": round(record.ended - record.started, 1),
                "turns": record.turns,
                "providers": ",".join(record.providers) or "-",
                "input_tokens": record.input_tokens,
                "output_tokens": record.output_tokens,
                "cost_usd": record.cost,
                "first_audio_ms": round(total / n, 1) if n else None,
                **({"channel": record.channel} if record.channel != "phone" else {}),
            },
        )


@hookimpl
def register_call_recorders(register: Register) -> None:
    register("log", LogRecorder)
