"""Text for a voice: sentences cut from a token stream, and what a voice should not read stripped out.

Gather mode speaks whole sentences (`Segmenter`, `speakable`, `clip`); relay mode sends tokens as they
come, cleaned by `TokenCleaner`, a character state machine that gives `speakable`'s result token by token.
"""

from __future__ import annotations

import re
import unicodedata

_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e no approx dept est fig inc ltd co mt ft jan feb mar apr jun "
    "jul aug sep sept oct nov dec a.m p.m u.s".split()
)
_ENDS_AND_CLOSERS = ".!?…\"')]”’"
_CANDIDATE = re.compile("[.!?…\n]")
_ALNUM = re.compile(r"[^\W_]")  # what str.isalnum() accepts (checked for every code point)


class Segmenter:
    """Cuts a token stream into speakable sentences as soon as each sentence is known to be complete."""

    def __init__(self, max_len: int = 240) -> None:
        self.buf = ""
        self.pos = 0  # everything before pos is known not to end a sentence
        self.max_len = max_len

    def feed(self, token: str) -> list[str]:
        """Add a token; return the sentences it completed."""
        settled = self.pos == len(self.buf)  # nothing before this token waits on what comes next
        self.buf += token
        if settled and len(self.buf) <= self.max_len and not _CANDIDATE.search(token):  # most tokens: no end here
            self.pos = len(self.buf)
            return []
        out: list[str] = []
        while (cut := self._boundary()) is not None:
            sentence, self.buf, self.pos = self.buf[:cut].strip(), self.buf[cut:].lstrip(), 0
            if sentence:
                out.append(sentence)
        return out

    def flush(self) -> list[str]:
        """The rest, at the end of the stream."""
        rest, self.buf, self.pos = self.buf.strip(), "", 0
        return [rest] if rest else []

    def _boundary(self) -> int | None:
        buf, n = self.buf, len(self.buf)
        for m in _CANDIDATE.finditer(buf, self.pos):
            i = m.start()
            ch = buf[i]
            if ch == "\n":
                if buf[:i].strip():
                    return i
                continue
            j = i + 1
            while j < n and buf[j] in _ENDS_AND_CLOSERS:
                j += 1
            k = j
            while k < n and buf[k] in " \t":
                k += 1
            if k == n:  # nothing after it yet: the next token decides ("Dr." or an end), and a reply
                self.pos = i  # that ends here stays whole, in one document with its end
                break
            if k == j:  # no space after it ("3.5", "e.g")
                continue
            if ch in ".…" and (buf[k].islower() or (ch == "." and self._abbreviation(buf[:i]))):
                continue
            return j
        else:
            self.pos = n
        if n > self.max_len:  # a long run without punctuation: cut at a pause or a space
            window = buf[: self.max_len]
            cut = max(window.rfind(", "), window.rfind("; "), window.rfind(": "))
            cut = cut + 1 if cut > self.max_len // 3 else window.rfind(" ")
            return cut if cut > 0 else self.max_len
        return None

    @staticmethod
    def _abbreviation(before: str) -> bool:
        word = before.rsplit(None, 1)[-1].lower() if before.strip() else ""
        return word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())


_MD_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_URL = re.compile(r"(?:https?://|www\.)\S+")
_MD_MARKS = re.compile(r"(\*\*|__|\*|`+|~~|^#+\s*|^\s*(?:[-*+•]|\d+[.)])\s+|^>\s*)", re.MULTILINE)


_MARKUP_HINTS = re.compile(r"[*_`#\[~>]|https?://|www\.|^\s*(?:[-+•]|\d+[.)])\s", re.MULTILINE)


def speakable(text: str) -> str:
    """Strip what a voice should not read: markdown, URLs, emoji."""
    if text.isascii() and not _MARKUP_HINTS.search(text):  # the common case: plain prose
        return " ".join(text.split())
    text = _URL.sub("", _MD_LINK.sub(r"\1", text))
    text = _MD_MARKS.sub("", text)
    text = "".join(c for c in text if unicodedata.category(c) not in ("So", "Cs", "Co") and c != "\ufe0f")
    return " ".join(text.split())


def clip(text: str, room: int) -> str:
    """Shorten text to at most `room` characters, at a word boundary, ending it with a full stop."""
    if len(text) <= room:
        return text
    cut = text[: max(room - 1, 0)].rpartition(" ")[0].rstrip(",;: ")
    return cut + "." if cut else ""


def has_words(text: str) -> bool:
    """Whether text has anything to say (a stray closing quote or dash has not)."""
    return _ALNUM.search(text) is not None


_MARK_PREFIX = re.compile(r"#+|[-+•]|\d{1,6}[.)]?|>")
_MARK = re.compile(r"#+|[-+•]|\d{1,6}[.)]|>")
_URL_STARTS = ("https://", "http://", "www.")


class TokenCleaner:
    """Strips markdown, links, URLs and emoji from a token stream, token by token, never splitting words.

    speakable() cleans whole sentences; a relay reply leaves token by token, so this is a
    character state machine that gives the same result however the text is cut into tokens. It holds
    back only what the next character decides: a possible list/heading marker at the start of a line
    ("-", "1.", "#"), a possible URL at the start of a word ("ht", "www"), a "~" or "_" that may open
    "~~"/"__", and a "]" that may open a link target. `*` and backticks are dropped wherever they are;
    `[text](url)` keeps the text; bare URLs are dropped to the next space; whitespace runs become one
    space (a newline too), with no space before the first word. Spaces inside tokens are kept.
    """

    def __init__(self) -> None:
        self.held = ""  # characters the next one decides about
        self.line_start = True  # nothing visible yet on this line
        self.column0 = True  # not even whitespace yet on this line ("#" and ">" count only here)
        self.word_start = True
        self.space = False  # a space is due before the next visible character
        self.started = False
        self.skip = ""  # "url": drop to the next whitespace; "link": drop to ")"
        self.pair = ""  # a "~" or "_" that may be the first of two
        self.bracket = False  # "]" just seen

    def feed(self, token: str) -> str:
        """Clean a token; return what can be sent now."""
        out: list[str] = []
        for c in token:
            self._char(c, out)
        return "".join(out)

    def flush(self) -> str:
        """The rest, at the end of the stream."""
        out: list[str] = []
        if self.pair:
            self._visible(self.pair, out)
            self.pair = ""
        if self.held:
            held, self.held = self.held, ""
            if not (self.line_start and held[0] in "#>" and _MARK.fullmatch(held)):
                self._emit(held, out)
        return "".join(out)

    def _char(self, c: str, out: list[str]) -> None:
        if self.skip:
            if self.skip == "link" and c == ")":
                self.skip = ""
                return
            if not c.isspace():
                return
            self.skip = ""
        if self.bracket:
            self.bracket = False
            if c == "(":
                self.skip = "link"
                return
        if self.pair:
            first, self.pair = self.pair, ""
            if c == first:  # "~~" or "__": emphasis marks
                self._begin_line(out)
                return
            self._visible(first, out)
        if c.isspace():
            self._settle(out)
            self.space = self.space or self.started
            self.word_start = True
            if c == "\n":
                self.line_start = self.column0 = True
            else:
                self.column0 = False
            return
        if c in "*`[\ufe0f\u200d" or "\U0001f3fb" <= c <= "\U0001f3ff" or unicodedata.category(c) in ("So", "Cs", "Co"):
            self._begin_line(out)  # dropped, but the line has begun (as in speakable)
            return
        if c == "]":
            self.bracket = True
        elif c in "~_":
            self.pair = c
        else:
            self._visible(c, out)

    def _settle(self, out: list[str]) -> None:
        """Whitespace decides what is held: a marker followed by a space is dropped, anything else kept."""
        if not self.held:
            return
        held, self.held = self.held, ""
        marker = self.line_start and _MARK.fullmatch(held) and (self.column0 or held[0] not in "#>")
        self.line_start = False
        if not marker:
            self._emit(held, out)

    def _visible(self, c: str, out: list[str]) -> None:
        if self.line_start:
            candidate = self.held + c
            if _MARK_PREFIX.fullmatch(candidate) and (self.column0 or candidate[0] not in "#>"):
                self.held = candidate
                return
            self._begin_line(out)
        if self.word_start or self.held:
            candidate = (self.held + c).lower()
            if any(url.startswith(candidate) for url in _URL_STARTS):
                self.word_start = False
                if candidate in _URL_STARTS:
                    self.held, self.skip = "", "url"
                else:
                    self.held += c
                return
            held, self.held = self.held, ""
            self.word_start = False
            if held:
                self._emit(held, out)
        self._emit(c, out)

    def _begin_line(self, out: list[str]) -> None:
        """Something other than a space follows what is held at the line's start."""
        if self.line_start and self.held:
            held, self.held = self.held, ""
            if held[0] not in "#>":  # "-5", "1.5", "12 ..." are text; "#Title", ">quote" are marks
                self._emit(held, out)
                self.word_start = False
        self.line_start = self.column0 = False

    def _emit(self, text: str, out: list[str]) -> None:
        if self.space:
            out.append(" ")
            self.space = False
        out.append(text)
        self.started = True
