"""TwiML out: escaped text, one verb per segment, whole documents (each under Twilio's 64 KB).

Small string templates rather than an XML builder: a document is built on every webhook request,
and the twilio package's VoiceResponse stays a test oracle (DESIGN.md, "Performance notes")."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from contract import Segment, Settings

XML_HEAD = '<?xml version="1.0" encoding="UTF-8"?><Response>'
_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&apos;"})
NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
MAX_DOC = 64_000


def esc(text: str) -> str:
    """Escape text for XML and drop characters XML cannot carry."""
    return NOT_XML.sub("", text).translate(_ESCAPES)


def verb(seg: Segment) -> str:
    """One segment as a TwiML verb."""
    if seg.kind == "pause":
        return '<Pause length="1"/>'
    if seg.kind == "hangup":
        return "<Hangup/>"
    if seg.kind == "dial":
        caller_id = f' callerId="{esc(seg.caller_id)}"' if seg.caller_id else ""
        return f"<Dial{caller_id}>{esc(seg.number)}</Dial>"
    if seg.url:
        return f"<Play>{esc(seg.url)}</Play>"
    return f"{_say_tag(seg.voice, seg.language)}{esc(seg.text)}</Say>"


@functools.lru_cache(maxsize=256)
def _say_tag(voice: str, language: str) -> str:
    """The opening <Say> of a voice and language (a few per deployment: built once each)."""
    attrs = (f' voice="{esc(voice)}"' if voice else "") + (f' language="{esc(language)}"' if language else "")
    return f"<Say{attrs}>"


def document(body: str) -> bytes:
    """A whole TwiML document."""
    return f"{XML_HEAD}{body}</Response>".encode()


def hang_up_after(seg: Segment) -> bytes:
    """A document that speaks one last phrase, then hangs up (the goodbye after MAX_MISSES misses)."""
    return document(verb(seg) + "<Hangup/>")


def render(segments: Sequence[Segment], *, gather: str, next_url: str = "") -> bytes:
    """A reply document: speech, then the next <Redirect>, an action, or the last part in a <Gather>."""
    final = any(s.kind == "end" for s in segments)
    verbs = [verb(s) for s in segments if s.kind != "end"]
    while sum(map(len, verbs)) > MAX_DOC - 1000:  # a hard cap, far above MAX_REPLY_CHARS
        verbs.pop(-2 if len(verbs) > 1 else -1)
    if not final:
        return document("".join(verbs) + f'<Redirect method="POST">{esc(next_url)}</Redirect>')
    if any(s.kind in ("hangup", "dial") for s in segments):
        return document("".join(verbs))
    last = verbs.pop() if verbs else ""
    return document("".join(verbs) + gather + last + "</Gather>")


def gather_tag(settings: Settings) -> str:
    """The <Gather> that listens for the caller's next turn."""
    return (
        '<Gather input="speech" speechTimeout="auto" actionOnEmptyResult="true" '
        f'action="/process-speech" method="POST" language="{esc(settings.language)}">'
    )
