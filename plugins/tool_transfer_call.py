"""Built-in tool: the model transfers the caller to a person (TRANSFER_NUMBER or named destinations)."""

from __future__ import annotations

import re
from typing import Any

from main import CallInfo, ConfigError, Register, Segment, Settings, Tool, ToolResult, ToolSpec, hookimpl

E164 = re.compile(r"\+[1-9]\d{6,14}")


def destinations(settings: Settings) -> dict[str, str]:
    """TRANSFER_NUMBER (as "default") and TRANSFER_DESTINATIONS ("sales=+1555...,support=+1555..."), checked."""
    found = {"default": number} if (number := settings.get("TRANSFER_NUMBER")) else {}
    for item in filter(None, (p.strip() for p in settings.get("TRANSFER_DESTINATIONS").split(","))):
        name, _, value = item.partition("=")
        found[name.strip().lower()] = value.strip()
    for name, value in found.items():
        if not E164.fullmatch(value):
            var = "TRANSFER_NUMBER" if name == "default" else "TRANSFER_DESTINATIONS"
            raise ConfigError(f"{var}: {value!r} for {name!r} is not an E.164 number like +15551234567")
    return found


class TransferCall(Tool):
    """Connects the caller to a person with <Dial> (relay mode: `end` with handoff data, then <Dial>)."""

    def __init__(self, settings: Settings, numbers: dict[str, str]) -> None:
        self.numbers = numbers
        self.caller_id = settings.get("TRANSFER_CALLER_ID", "caller")  # caller | number | +E.164
        if self.caller_id not in ("caller", "number") and not E164.fullmatch(self.caller_id):
            raise ConfigError(f"TRANSFER_CALLER_ID={self.caller_id!r}: use caller, number or an E.164 number")
        names = sorted(numbers)
        parameters: dict[str, Any] = {
            "type": "object",
            "properties": {
                "reason": {"type": "string", "description": "Why the caller wants a person, in a few words."}
            },
        }
        if names != ["default"]:
            parameters["properties"]["destination"] = {
                "type": "string",
                "enum": names,
                "description": "Who to transfer to.",
            }
            parameters["required"] = ["destination"]
        self.spec = ToolSpec(
            name="transfer_call",
            description=(
                "Transfer the caller to a human. Use it when the caller asks for a person, an agent or an operator, "
                "or when you cannot help. Tell the caller you are transferring them in the same reply."
            ),
            parameters=parameters,
        )

    async def run(self, arguments: dict[str, Any], call: CallInfo) -> ToolResult:
        name = str(arguments.get("destination") or "default").lower()
        if name not in self.numbers:
            return ToolResult(
                content=f"There is no destination {name!r}; choose one of {', '.join(sorted(self.numbers))}."
            )
        caller_id = {"caller": call.caller, "number": call.to}.get(self.caller_id, self.caller_id)
        dial = Segment(kind="dial", number=self.numbers[name], caller_id=caller_id if E164.fullmatch(caller_id) else "")
        return ToolResult(content="The caller is transferred after your reply. Tell them to hold.", action=dial)


def transfer_call(settings: Settings) -> TransferCall | None:
    """The tool, or None (not offered) when no number to transfer to is configured."""
    numbers = destinations(settings)
    return TransferCall(settings, numbers) if numbers else None


@hookimpl
def register_tools(register: Register) -> None:
    register("transfer_call", transfer_call)
