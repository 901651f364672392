"""The /ui playground in a real headless Chromium (Debian's, driven by Playwright) against a real
`ctxsteer serve` of the embedded model behind an API key.

Checks what a user sees: the key field (a missing or wrong key shows the server's message), a compare
run whose two answers equal what the API returns for the same requests, the steered spans highlighted
exactly where /tokenize puts them, an API error shown as the server's message, and the optional "Output
format" box (a JSON schema sent as `response_format`, the answer pretty-printed; an unparsable schema is an
inline error and sends nothing; a schema the server cannot compile is its 400). A screenshot of the
compare view is saved to build/test-artifacts/ui-compare.png (the README's picture comes from it).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from debian_packages import ensure_binaries
from server_process import ServerProcess, serve

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "build" / "test-artifacts"
API_KEY = "ui-test-key"
# As the workplace probe starts it: no sandbox as root, and no background traffic to unreachable hosts.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
# The README's memo example: unsteered, SmolLM2 answers from its prior ("Tuesday"); steered, from the memo.
SYSTEM = "You are a helpful assistant."
DOCUMENT = "The meeting was moved from Tuesday to Friday at 3pm, in room 12."
QUESTION = "When is the meeting?"
STRENGTH = "3"  # a slider step
MAX_TOKENS = 32

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the [dev] extra")


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's Chromium, installed when missing (before the server starts, so a skip costs nothing)."""
    (path,) = ensure_binaries(("chromium",), ("chromium",))
    return path


@pytest.fixture(scope="module")
def server(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args = ("--api-key", API_KEY, "--max-model-len", "2048")
    with serve(None, *args, log_dir=tmp_path_factory.mktemp("ui-logs")) as sp:
        yield sp


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Any]:
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any, tmp_path: Path) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    yield pg
    context.close()


def _messages() -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"{DOCUMENT}\n\n{QUESTION}"}]


def _api_answer(sp: ServerProcess, strength: float) -> tuple[str, list[float], list[float]]:
    """The same request the page sends, without streaming: the page must show exactly this text and
    these per-token context attentions (as served, as if unsteered)."""
    body = {
        "messages": _messages(),
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "steering": {"strength": strength, "targets": ["user"]},
        "report": {"context_attention": True},
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(f"{sp.url}/v1/chat/completions", json=body, headers=headers, timeout=120)
    r.raise_for_status()
    choice = r.json()["context_attention"]["choices"][0]
    return r.json()["choices"][0]["message"]["content"], choice["per_token"], choice["unsteered_per_token"]


def _strip_values(page: Any, index: int) -> list[float]:
    cells = page.locator("#looked .strip").nth(index).locator(".cell")
    return [float(v) for v in cells.evaluate_all("(els) => els.map((e) => e.dataset.value)")]


def _steered_text(sp: ServerProcess) -> str:
    """The steered tokens' text as /tokenize reports them (joined vocabulary pieces)."""
    body = {"messages": _messages(), "steering": {"strength": float(STRENGTH)}, "return_token_strs": True}
    r = httpx.post(f"{sp.url}/tokenize", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    r.raise_for_status()
    res = r.json()
    assert res["steered_tokens"] > 0 and len(res["token_strs"]) == res["count"]
    return "".join("".join(res["token_strs"][s:e]) for s, e in res["steered_spans"])


def _open(page: Any, sp: ServerProcess) -> None:
    page.goto(f"{sp.url}/ui", wait_until="load")


def _set_key(page: Any, key: str) -> None:
    page.fill("#api-key", key)
    page.dispatch_event("#api-key", "change")


def test_bad_key_shows_the_servers_message(page: Any, server: ServerProcess) -> None:
    _open(page, server)
    page.wait_for_selector("#error:not([hidden])")
    assert "Missing API key" in page.inner_text("#error")
    _set_key(page, "wrong-key")
    page.wait_for_function("document.getElementById('error').textContent.includes('Incorrect API key')")
    _set_key(page, API_KEY)
    page.wait_for_selector("#error", state="hidden")
    assert page.input_value("#model") != ""


def _fill(page: Any, server: ServerProcess) -> None:
    """Open the page with the key, and type the example's documents and question."""
    _open(page, server)
    _set_key(page, API_KEY)
    page.wait_for_selector("#error", state="hidden")
    page.fill("#documents", DOCUMENT)
    page.fill("#question", QUESTION)


def test_compare_answers_and_spans(page: Any, server: ServerProcess) -> None:
    _fill(page, server)
    page.fill("#system", SYSTEM)
    page.fill("#max-tokens", str(MAX_TOKENS))
    page.fill("#temperature", "0")
    set_slider = f"(el) => {{ el.value = '{STRENGTH}'; el.dispatchEvent(new Event('input')); }}"
    page.eval_on_selector("#strength", set_slider)
    page.click("#compare")
    # Compare ends with the spans panel filled; the buttons come back when both streams are done.
    page.wait_for_selector("#spans-view .steered", timeout=120_000)
    page.wait_for_selector("#compare:not([disabled])", timeout=120_000)
    assert page.is_hidden("#error"), page.inner_text("#error")

    base, steered = page.text_content("#text-base"), page.text_content("#text-steered")
    want_base, base_ctx, _ = _api_answer(server, 1.0)
    want_steered, steered_ctx, steered_plain = _api_answer(server, float(STRENGTH))
    assert base == want_base and base
    assert steered == want_steered and steered
    assert f"strength {STRENGTH}," in page.inner_text("#meta-steered")
    if base != steered:  # every word that differs is highlighted, none that is shared
        assert page.locator("#text-steered mark.diff").count() > 0

    highlighted = "".join(page.locator("#spans-view .steered").all_text_contents())
    want = _steered_text(server).replace("Ġ", " ").replace("Ċ", "\n")
    assert highlighted == want and "room 12" in highlighted and QUESTION in highlighted
    assert SYSTEM.split()[0] not in highlighted  # the system prompt is not steered
    # Where it looked: strips for unsteered (as served) and steered (as served, as if unsteered), one
    # shaded cell per generated token with the API's values (the page's two requests ran batched, the
    # API's alone: equal to fp32 batching noise).
    assert page.locator("#looked .strip").count() == 3
    assert _strip_values(page, 0) == pytest.approx(base_ctx, abs=1e-4)
    assert _strip_values(page, 1) == pytest.approx(steered_ctx, abs=1e-4)
    assert _strip_values(page, 2) == pytest.approx(steered_plain, abs=1e-4)
    assert sum(steered_ctx) > sum(steered_plain)  # the steered answer looked at the memo more
    assert "of attention on the context" in page.inner_text("#looked")

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "ui-compare.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_auto_strength_reports_the_servers_choice(page: Any, server: ServerProcess) -> None:
    """The "auto" box sends strength "auto" bounded by the slider; the page shows what the server chose."""
    _fill(page, server)
    page.fill("#max-tokens", "8")
    page.check("#strength-auto")
    page.click("#run")
    page.wait_for_selector("#run:not([disabled])", timeout=120_000)
    assert page.is_hidden("#error"), page.inner_text("#error")
    meta = page.inner_text("#meta-steered")
    assert meta.startswith("auto: chose strength ") and "target 50.0%" in meta, meta
    chosen = float(meta.split("chose strength ")[1].split()[0])
    assert 1.0 <= chosen <= float(STRENGTH)
    assert page.inner_text("#title-steered") == f"Strength auto (up to {STRENGTH})"


def test_api_error_is_shown(page: Any, server: ServerProcess) -> None:
    """A request the server refuses (a layer the model does not have) shows its 400 message."""
    _fill(page, server)
    page.fill("#layers", "999")
    page.click("#run")
    page.wait_for_selector("#error:not([hidden])", timeout=60_000)
    text = page.inner_text("#error")
    assert text.startswith("400: ") and "layer" in text.lower(), text


# The "Output format" box's schema: an object with a bounded string and an integer, nothing else.
SCHEMA = {
    "type": "object",
    "properties": {"day": {"type": "string", "maxLength": 20}, "room": {"type": "integer"}},
    "required": ["day", "room"],
    "additionalProperties": False,
}


def _chat_requests(page: Any) -> list[Any]:
    """Every /v1/chat/completions request the page sends from now on (the page's network events)."""
    sent: list[Any] = []
    page.on("request", lambda r: sent.append(r) if r.url.endswith("/v1/chat/completions") else None)
    return sent


def _fill_schema(page: Any, text: str) -> None:
    page.click("#output-format summary")  # the section starts collapsed
    page.fill("#schema", text)


def test_json_schema_box_sends_response_format(page: Any, server: ServerProcess) -> None:
    """A filled schema box sends `response_format` json_schema; the answer shows as pretty-printed JSON
    with the schema's keys."""
    _fill(page, server)
    assert not page.is_visible("#schema")  # collapsed: the page looks as before until opened
    sent = _chat_requests(page)
    _fill_schema(page, json.dumps(SCHEMA))
    page.fill("#max-tokens", "64")
    page.click("#run")
    page.wait_for_selector("#run:not([disabled])", timeout=120_000)
    assert page.is_hidden("#error"), page.inner_text("#error")
    assert page.is_hidden("#schema-error")

    assert len(sent) == 1
    fmt = json.loads(sent[0].post_data)["response_format"]
    assert fmt == {"type": "json_schema", "json_schema": {"name": "ui_schema", "schema": SCHEMA}}
    text = page.text_content("#text-steered")
    answer = json.loads(text)
    assert set(answer) == {"day", "room"}, text
    assert isinstance(answer["day"], str) and len(answer["day"]) <= 20
    assert isinstance(answer["room"], int) and not isinstance(answer["room"], bool)
    assert text == json.dumps(answer, indent=2, ensure_ascii=False)  # pretty-printed as JSON.stringify does
    assert "finish: stop" in page.inner_text("#meta-steered")


def test_invalid_schema_is_an_inline_error_and_sends_nothing(page: Any, server: ServerProcess) -> None:
    """Unparsable JSON in the schema box: an inline error under it, no request; a parsable schema the
    server cannot compile is its 400, shown as every API error is."""
    _fill(page, server)
    sent = _chat_requests(page)
    _fill_schema(page, '{"type": "object", "properties": {')
    page.click("#run")
    page.wait_for_selector("#schema-error:not([hidden])")
    assert page.inner_text("#schema-error").startswith("Not valid JSON"), page.inner_text("#schema-error")
    page.click("#compare")
    page.wait_for_timeout(500)  # a request would have left by now
    assert sent == [] and page.is_hidden("#error")
    assert not page.is_disabled("#run") and not page.is_disabled("#compare")

    page.fill("#schema", json.dumps({"type": "nonsense"}))
    assert page.is_hidden("#schema-error")  # editing clears it
    page.click("#run")
    page.wait_for_selector("#error:not([hidden])", timeout=60_000)
    text = page.inner_text("#error")
    assert text.startswith("400: ") and len(sent) == 1, text
    assert page.is_hidden("#schema-error")
