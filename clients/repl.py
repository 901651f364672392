"""The interactive `ctxsteer chat` loop: readline editing and history, slash commands, streamed answers.

Ctrl-C while an answer streams stops that answer (closing the stream makes the server abort it) and
returns to the prompt; Ctrl-C at the prompt clears the line; Ctrl-D or /quit leaves.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from ctxsteer.clients.errors import ClientError
from ctxsteer.clients.session import ChatSession, describe
from ctxsteer.clients.steering import Steering, SteeringError

__all__ = ["HELP", "PROMPT", "history_path", "run_repl"]

PROMPT = "> "
HELP = """commands:
  /strength S     steering strength for the next answers (>= 1; 1 or "off" = no steering)
  /strength       show the current strength
  /context FILE   load a document; it goes with your next message and is steered from then on
  /context        list the loaded documents
  /reset          forget the conversation (loaded documents are sent again with the next message)
  /help           this text
  /quit           leave (or Ctrl-D); Ctrl-C stops an answer"""


def history_path() -> Path:
    """CTXSTEER_HISTORY, else $XDG_STATE_HOME/ctxsteer/chat_history (~/.local/state by default)."""
    if explicit := os.environ.get("CTXSTEER_HISTORY"):
        return Path(explicit)
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "ctxsteer" / "chat_history"


def _readline_history() -> Callable[[], None]:
    """Load the line history; return the function that saves it (a no-op without readline)."""
    try:
        import readline
    except ImportError:  # e.g. Windows without pyreadline
        return lambda: None
    path = history_path()
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError as exc:
            print(f"(history not saved: {exc})", file=sys.stderr)

    return save


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _strength(session: ChatSession, arg: str) -> None:
    if not arg:
        s = session.strength
        _say(f"strength {'server default' if s is None else f'{s:g}'}")
        return
    try:
        value = 1.0 if arg.lower() == "off" else float(arg)
        Steering(strength=value)  # the server's rule: finite and >= 1
    except ValueError as exc:
        message = exc.message if isinstance(exc, SteeringError) else f"not a number: {arg!r}"
        _say(f"error: strength {message}")
        return
    session.strength = value
    _say(f"strength {value:g}" + (" (steering off)" if value == 1.0 else ""))


def _context(session: ChatSession, arg: str) -> None:
    if not arg:
        names = [f"  {name} ({len(text)} chars)" for name, text in session.documents]
        _say("\n".join(names) if names else "no documents loaded")
        return
    path = Path(arg).expanduser()
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        _say(f"error: cannot read {arg}: {exc.strerror or exc}")
        return
    session.add_context(str(path), text)
    _say(f"loaded {path} ({len(text)} chars); it goes with your next message")


def _command(session: ChatSession, line: str) -> bool:
    """Run a slash command; False means leave."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit", "/q"):
        return False
    if name == "/strength":
        _strength(session, arg)
    elif name == "/context":
        _context(session, arg)
    elif name == "/reset":
        session.reset()
        _say("conversation cleared")
    elif name in ("/help", "/?"):
        _say(HELP)
    else:
        _say(f"unknown command {name}; /help lists them")
    return True


def _answer(session: ChatSession, question: str) -> None:
    try:
        stream = session.answer(question, sys.stdout)
    except KeyboardInterrupt:
        _say("[answer stopped]")
        return
    except ClientError as exc:
        _say(f"error: {exc}")
        return
    _say(describe(stream))


def run_repl(session: ChatSession, banner: str) -> int:
    save_history = _readline_history()
    _say(banner)
    try:
        while True:
            try:
                line = input(PROMPT).strip()
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                print()
                continue
            if not line:
                continue
            if line.startswith("/"):
                if not _command(session, line):
                    return 0
                continue
            _answer(session, line)
    finally:
        save_history()
