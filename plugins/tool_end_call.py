"""Built-in tool: the model hangs up (after saying goodbye) when the caller is done."""

from __future__ import annotations

from typing import Any

from main import CallInfo, Register, Segment, Settings, Tool, ToolResult, ToolSpec, hookimpl


class EndCall(Tool):
    """Ends the call with <Hangup/> (relay mode: an `end` message) once the reply has been spoken."""

    spec = ToolSpec(
        name="end_call",
        description=(
            "Hang up the phone call. Use it when the caller says goodbye, says that is all, or asks to end "
            "the call. Say a short goodbye in the same reply."
        ),
    )

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def run(self, arguments: dict[str, Any], call: CallInfo) -> ToolResult:
        return ToolResult(content="The call ends after your reply. Say a short goodbye.", action=Segment(kind="hangup"))


@hookimpl
def register_tools(register: Register) -> None:
    register("end_call", EndCall)
