"""The offline default model: repeats what it heard, so a person can see the loop work."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from main import LLMProvider, Message, Settings, ToolSpec, Usage, hookimpl


class EchoProvider(LLMProvider):
    """Answers 'You said: <last caller turn>.' word by word, like a streaming model."""

    name = "echo"

    def __init__(self, settings: Settings) -> None:
        self.prefix = settings.get("ECHO_PREFIX", "You said:")

    async def stream(
        self, messages: Sequence[Message], *, system: str, tools: Sequence[ToolSpec] = ()
    ) -> AsyncIterator[str | Usage]:
        heard = next((m.content for m in reversed(messages) if m.role == "user"), "")
        reply = f"{self.prefix} {heard.rstrip('.!?')}."
        words = reply.split(" ")
        for i, word in enumerate(words):
            yield word if i == 0 else " " + word
        yield Usage(input_tokens=sum(len(m.content.split()) for m in messages), output_tokens=len(words))


@hookimpl
def register_llm_providers(register):  # type: ignore[no-untyped-def]
    register("echo", EchoProvider)
