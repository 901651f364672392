"""`ctxsteer chat | models | health` as users run them: subprocesses for one-shot use and exit codes, and
the interactive chat driven through a pseudo-terminal (real Ctrl-C via the tty driver)."""

from __future__ import annotations

import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from server_metrics import finished_requests
from server_process import ServerProcess, free_port, serve
from tiny import save_tiny_model
from waiting import DEADLINE_S, wait_for

from ctxsteer.clients import Client, Steering
from ctxsteer.clients.prompts import ask_messages

KEY = "cli-key"
DOC = "The Eiffel Tower is in Paris. It was completed in 1889."
CLI = [sys.executable, "-m", "ctxsteer.server.cli"]
FOOTER = re.compile(r"\[(\d+) prompt \+ (\d+) completion tokens.*\| (.*)\]")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One slot, so an answer that Ctrl-C failed to abort would hold up the next request for many seconds
    (long positions: an interrupted answer could run ~30 s)."""
    model = save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama", max_position_embeddings=4096)
    flags = ("--max-num-seqs", "1", "--api-key", KEY)
    with serve(str(model), *flags, log_dir=tmp_path_factory.mktemp("logs")) as sp:
        yield sp


@pytest.fixture
def env(server: ServerProcess, tmp_path: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CTXSTEER_", "OPENAI_"))}
    return {
        **base,
        "CTXSTEER_BASE_URL": server.url + "/v1",
        "CTXSTEER_API_KEY": KEY,
        "CTXSTEER_HISTORY": str(tmp_path / "history"),
        "PYTHONUNBUFFERED": "1",
        "TERM": "dumb",
    }


@pytest.fixture
def doc(tmp_path: Path) -> Path:
    path = tmp_path / "doc.txt"
    path.write_text(DOC)
    return path


def run(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], input=stdin, env=env, capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------- one-shot


def test_one_shot_prints_the_answer_and_the_applied_steering(
    env: dict[str, str], server: ServerProcess
) -> None:
    p = run(env, "chat", "--strength", "2", "--max-tokens", "8", "--temperature", "0", "Where is the tower?")
    assert p.returncode == 0, p.stderr
    with Client(server.url + "/v1", api_key=KEY) as c:
        expected = c.chat(ask_messages("Where is the tower?"), 2, max_tokens=8, temperature=0)
    text = expected.text
    assert p.stdout == text + ("\n" if text and not text.endswith("\n") else "")
    [(prompt, completion, steering)] = FOOTER.findall(p.stderr)
    assert (int(prompt), int(completion)) == (expected.usage.prompt_tokens, expected.usage.completion_tokens)
    steered = expected.steering.steered_tokens
    assert steering == f"steering strength 2 (alpha 0.5) on {steered} of {prompt} prompt tokens, layers all"


def test_one_shot_from_stdin_with_context_files(
    env: dict[str, str], server: ServerProcess, doc: Path
) -> None:
    steer_doc = ("--context", str(doc), "--focus", "context", "--strength", "3", "--max-tokens", "2")
    p = run(env, "chat", *steer_doc, "-q", stdin="When?")
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""  # -q: the answer only
    p = run(env, "chat", *steer_doc, "When?")
    assert p.returncode == 0, p.stderr
    with Client(server.url + "/v1", api_key=KEY) as c:
        doc_tokens = c.tokenize(ask_messages("When?", DOC), steering=Steering(spans=[DOC])).steered_tokens
    assert f"steering strength 3 (alpha 0.333333) on {doc_tokens} of" in p.stderr
    p = run(env, "chat", "--context", "-", "--max-tokens", "2", "When?", stdin=DOC)  # the document on stdin
    assert p.returncode == 0 and FOOTER.search(p.stderr), p.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["chat", "--strength", "0.5", "hi"], 2, "--strength: must be >= 1"),
        (["chat", "--context", "/no/such/file", "hi"], 2, "cannot read --context /no/such/file"),
        (["chat", "--max-tokens", "many", "hi"], 2, "--max-tokens: invalid int value"),
        (["chat", "--url", "localhost:8000", "hi"], 2, "base URL must look like"),
        (["models", "--bogus"], 2, "unrecognized arguments: --bogus"),
        (["chat", "--model", "no-such-model", "hi"], 1, "404 model_not_found (model)"),
        (["chat", "--max-tokens", "100000", "hi"], 1, "400 context_length_exceeded"),
    ],
)
def test_exit_codes_and_messages(env: dict[str, str], args: list[str], code: int, message: str) -> None:
    p = run(env, *args)
    assert (p.returncode, p.stdout) == (code, "")
    assert message in p.stderr and "Traceback" not in p.stderr


def test_unreachable_or_unauthorised_server_is_exit_1(env: dict[str, str]) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    for args in (["chat", "--url", dead, "hi"], ["health", "--url", dead]):
        p = run(env, *args)
        assert p.returncode == 1 and "cannot connect" in p.stderr and "Traceback" not in p.stderr, args
    p = run({**env, "CTXSTEER_API_KEY": "wrong"}, "models")
    assert p.returncode == 1 and "401 invalid_api_key" in p.stderr


def test_models_and_health(env: dict[str, str]) -> None:
    p = run(env, "models")
    assert (p.returncode, p.stdout) == (0, "llama\t(max_model_len 4096)\n")
    p = run(env, "models", "--json")
    assert p.returncode == 0 and '"id": "llama"' in p.stdout
    p = run(env, "health")
    assert p.returncode == 0 and p.stdout.startswith("ok, ready, model llama, version ")


@pytest.mark.parametrize("command", ["chat", "models", "health"])
def test_help_is_complete_with_an_example(env: dict[str, str], command: str) -> None:
    p = run(env, command, "--help")
    assert p.returncode == 0 and f"ctxsteer {command}" in p.stdout
    assert "examples:" in p.stdout and "Exit codes:" in p.stdout
    flags = {"--url", "--api-key", "--timeout"} | (
        {"--model", "--strength", "--context", "--system", "--focus", "--max-tokens", "--param", "--quiet"}
        if command == "chat"
        else {"--json"}
    )
    assert all(f in p.stdout for f in flags)
    top = run(env, "--help")
    assert re.search(rf"^  {command} +\w", top.stdout, re.M)


EXAMPLES = Path(__file__).resolve().parents[1] / "clients" / "examples"


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.iterdir() if p.suffix in (".py", ".sh")))
def test_examples_run(env: dict[str, str], name: str) -> None:
    """The examples read CTXSTEER_BASE_URL/CTXSTEER_API_KEY, so they run against the test server too."""
    if name.endswith(".sh") and not shutil.which("curl"):
        pytest.skip("curl is not installed")
    cmd = ["bash" if name.endswith(".sh") else sys.executable, str(EXAMPLES / name)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "steer" in p.stdout and "Traceback" not in p.stderr


# ---------------------------------------------------------------- interactive


class Terminal:
    """A child process on a pseudo-terminal: what a user types, what the user sees."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child: the pty is its controlling terminal, so \x03 sends it SIGINT
            try:
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.seen = ""
        self.pos = 0

    def _read(self, timeout: float) -> bool:
        if not select.select([self.fd], [], [], timeout)[0]:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            data = b""
        if not data:
            raise EOFError(self.seen[-3000:])
        self.seen += data.decode(errors="replace")
        return True

    def expect(self, pattern: str, timeout: float = DEADLINE_S) -> re.Match[str]:
        """Wait for `pattern` in the output after the previous match."""
        rx, deadline = re.compile(pattern), time.monotonic() + timeout
        while not (m := rx.search(self.seen, self.pos)):
            left = deadline - time.monotonic()
            assert left > 0, f"no {pattern!r} in:\n{self.seen[self.pos :][-3000:]}"
            self._read(left)
        self.pos = m.end()
        return m

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = DEADLINE_S) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:
                self._read(0.05)
            except EOFError:
                pass
        raise AssertionError(f"still running:\n{self.seen[-3000:]}")

    def close(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)


@pytest.fixture
def terminal(env: dict[str, str]) -> Iterator[Callable[..., Terminal]]:
    """Start `ctxsteer chat ARGS...` on a pseudo-terminal; killed at the end of the test."""
    opened: list[Terminal] = []

    def start(*args: str) -> Terminal:
        t = Terminal([*CLI, "chat", *args], env)
        opened.append(t)
        return t

    yield start
    for t in opened:
        t.close()


PROMPT = r"(?m)^> "
LONG_ANSWER = ("--max-tokens", "4000", "--param", "ignore_eos=true")  # ~30 s of tokens unless stopped


def aborted(server: ServerProcess) -> float:
    return finished_requests(server.url).get("abort", 0)


def wait_aborted(server: ServerProcess, before: float) -> None:
    """Wait for the server to count one more aborted request than `before`. An answer that Ctrl-C did not
    abort runs out as "length" instead (~30 s), so this then fails at the deadline."""
    wait_for(lambda: aborted(server) == before + 1, "the server to abort the answer")


def test_repl_commands_context_and_history(
    terminal: Callable[..., Terminal], doc: Path, env: dict[str, str], server: ServerProcess
) -> None:
    t = terminal("--max-tokens", "6", "--temperature", "0")
    t.expect(r"ctxsteer chat: llama at http://127\.0\.0\.1:\d+/v1, strength server default")
    t.expect(PROMPT)
    t.send("hello\r")
    assert "steering off (strength 1)" in t.expect(r"\[\d+ prompt .*\]").group(0)
    t.expect(PROMPT)
    t.send("/strength 0.5\r")
    t.expect(r"error: strength must be >= 1")
    t.send("/strength 2\r")
    t.expect(r"(?m)^strength 2\r?$")
    t.send(f"/context {doc}\r")
    t.expect(rf"loaded {re.escape(str(doc))} \({len(DOC)} chars\)")
    t.send("When was it completed?\r")
    first = FOOTER.search(t.expect(r"\[\d+ prompt .*\]").group(0))
    assert first and first.group(3).startswith("steering strength 2 (alpha 0.5) on ")
    t.send("And where is it?\r")  # second turn: the history (document included) is sent again
    second = FOOTER.search(t.expect(r"\[\d+ prompt .*\]").group(0))
    assert second and int(second.group(1)) > int(first.group(1)) + int(first.group(2))
    t.send("/reset\r")
    t.expect("conversation cleared")
    t.send("When was it completed?\r")  # after /reset: the document goes with this message again
    again = FOOTER.search(t.expect(r"\[\d+ prompt .*\]").group(0))
    with Client(server.url + "/v1", api_key=KEY) as c:  # exactly one user turn: the document, the question
        fresh = c.tokenize(ask_messages("When was it completed?", DOC), steering=Steering(strength=2))
    assert again and again.group(3) == f"steering strength 2 (alpha 0.5) on {fresh.steered_tokens} of " + (
        f"{fresh.count} prompt tokens, layers all"
    )
    t.expect(PROMPT)
    t.send("half a line\x03")  # Ctrl-C at the prompt drops the line, keeps the chat
    t.expect(PROMPT)
    t.send("/nope\r")
    t.expect("unknown command /nope")
    t.send("/quit\r")
    assert t.wait() == 0
    history = Path(env["CTXSTEER_HISTORY"]).read_text()
    assert "And where is it?" in history and "/reset" in history


def test_repl_ctrl_c_stops_the_answer_not_the_chat(
    terminal: Callable[..., Terminal], server: ServerProcess
) -> None:
    t = terminal(*LONG_ANSWER)
    t.expect(PROMPT)
    before = aborted(server)
    t.send("Tell me everything.\r")
    t.expect(r"Tell me everything\.\r?\n")
    t.expect(r"[\s\S]")  # the answer is streaming
    t.send("\x03")
    t.expect(r"\[answer stopped\]")
    t.expect(PROMPT)
    wait_aborted(server, before)  # closing the stream aborted the answer on the server
    t.send("/strength 3\r")  # the chat goes on
    t.expect(r"(?m)^strength 3\r?$")
    # Ctrl-D only once the next prompt is up: readline switches the terminal to raw mode before it draws
    # the prompt, and an EOF typed in the canonical-mode gap before that is dropped by the tty.
    t.expect(PROMPT)
    t.send("\x04")  # Ctrl-D leaves
    assert t.wait() == 0


def test_one_shot_ctrl_c_exits_130_and_aborts_the_answer(
    terminal: Callable[..., Terminal], server: ServerProcess
) -> None:
    """On a terminal, with PROMPT given (one-shot mode): Ctrl-C mid-answer is exit 130, quietly."""
    before = aborted(server)
    t = terminal(*LONG_ANSWER, "Tell me everything.")
    t.expect(r"\S")  # the answer is streaming (nothing else goes to the terminal before it)
    t.send("\x03")
    assert t.wait() == 130
    assert "Traceback" not in t.seen and not FOOTER.search(t.seen), t.seen[-3000:]
    wait_aborted(server, before)
