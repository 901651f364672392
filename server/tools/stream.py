"""Forced calls streamed as they are generated (vLLM's `extract_tool_calls_streaming`, for the grammar's
JSON): `CallScanner` reads the output piece by piece, with just enough JSON (strings, escapes, nesting) to
know when a call's name is complete and where its arguments value starts and ends, and hands out
`CallPiece`s: a call's header as soon as its name is known, then its arguments' text as it grows. The
arguments are the output as written minus the whitespace outside strings, a prefix-stable rule, so what was
streamed is always a prefix of the final arguments, and `ConstrainedCalls.parse` reads a whole output with
the same scanner: streamed and non-streamed answers agree character for character.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ctxsteer.server.tools.parsers import ParsedCall

_BLANKS = " \t\n\r"  # JSON's whitespace


@dataclass(frozen=True, slots=True)
class CallPiece:
    """The next piece of call `index`: its header (`name` set, the call starts) or more argument text."""

    index: int
    name: str | None = None
    arguments: str = ""


class CallScanner:
    """A forced call's output, fed in pieces. `name` given: the output IS that function's arguments (one
    call, announced on the first feed); None ("required"): `[{"name": ..., "arguments": {...}}, ...]`,
    where arguments written before their name are held until it is known."""

    def __init__(self, name: str | None, parallel: bool = True) -> None:
        self.named, self.limit = name, None if parallel else 1
        self.found: list[tuple[str, list[str]]] = []  # per announced call: name, argument text
        self.out: list[CallPiece] = []  # pieces not handed out yet
        self.stack: list[str] = []  # open "[" / "{" outside the arguments being read
        self.in_string = self.escaped = False
        self.token = ""  # the string being read at the call object's level (a key, the name)
        self.key: str | None = None  # the last key read at the call object's level
        self.field: str | None = None  # that key while its value is being read
        self.depth = 0  # nesting inside the arguments value
        self.item: str | None = None  # the open call object's name, once known
        self.live = False  # the open call object was announced (not past the limit)
        self.held = ""  # its arguments written before its name

    def feed(self, text: str) -> list[CallPiece]:
        """The pieces `text` completes, consecutive argument text of one call merged."""
        if self.named is not None and not self.found:
            self._announce(self.named)
        for c in text:
            if self.named is not None:
                self._minified(c)
            else:
                self._step(c)
        out, self.out = self.out, []
        return out

    def calls(self) -> list[ParsedCall]:
        """Every call announced so far, its arguments as far as they were written."""
        return [ParsedCall(name, "".join(args)) for name, args in self.found]

    def _announce(self, name: str) -> bool:
        if self.limit is not None and len(self.found) >= self.limit:
            return False
        self.found.append((name, []))
        self.out.append(CallPiece(len(self.found) - 1, name))
        return True

    def _arg(self, text: str) -> None:
        """Argument text of the current call (held while its name is unknown)."""
        if self.named is None and not self.live:
            if self.item is None:
                self.held += text
            return  # else a call past the limit: no parallel calls
        self.found[-1][1].append(text)
        index, last = len(self.found) - 1, self.out[-1] if self.out else None
        if last is not None and last.name is None and last.index == index:
            self.out[-1] = CallPiece(index, None, last.arguments + text)
        else:
            self.out.append(CallPiece(index, None, text))

    def _string(self, c: str) -> bool:
        """Advance a string's state on `c`; True when `c` is part of one (both quotes included)."""
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif c == "\\":
                self.escaped = True
            elif c == '"':
                self.in_string = False
            return True
        self.in_string = c == '"'
        return self.in_string

    def _minified(self, c: str) -> None:
        """Argument text as written, less the whitespace outside strings."""
        if self._string(c) or c not in _BLANKS:
            self._arg(c)

    def _step(self, c: str) -> None:
        """One character of a "required" output."""
        if self.field == "arguments" and (self.depth or self.in_string or c not in ",}"):
            if not self.in_string and c in "[{":
                self.depth += 1
            elif not self.in_string and c in "]}":
                self.depth -= 1
            self._minified(c)
            return
        level, opening = len(self.stack), not self.in_string and c == '"'
        if self._string(c):
            self.token = c if opening else self.token + c
            if not self.in_string and level == 2:
                self._string_done(self.token)
        elif c in "[{":
            self.stack.append(c)
            if self.stack == ["[", "{"]:  # a call object opens
                self.item, self.live, self.held, self.key, self.field = None, False, "", None, None
        elif c in "]}" and self.stack:
            self.stack.pop()
            if level == 2:
                self._item_done()
        elif level == 2 and c == ":":
            self.field = self.key
        elif level == 2 and c == ",":
            self.key = self.field = None

    def _string_done(self, token: str) -> None:
        """A string at the call object's level: a key, or the value of "name"."""
        try:
            value = json.loads(token)
        except ValueError:
            return
        if self.field is None:
            self.key = value
        elif self.field == "name" and self.item is None and isinstance(value, str):
            self.item, self.live = value, self._announce(value)
            held, self.held = self.held, ""
            if held:
                self._arg(held)

    def _item_done(self) -> None:
        """A call object closed: one whose arguments never came has `{}`, as the parsers read it."""
        if self.live and not self.found[-1][1]:
            self._arg("{}")
        self.item, self.live, self.key, self.field = None, False, None, None
