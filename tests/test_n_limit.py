"""The `n` (choices per request) limit on a real `ctxsteer serve` (tiny model, local engine) through the
official openai SDK: more choices than the server can ever hold (--max-num-seqs + --max-queue) is a 400
naming `n` and the limit, on both routes and streamed too; exactly the limit is served. The HTTP layer's
own tests use a fake engine; this checks the limit the real engine reports."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from server_process import serve
from tiny import save_tiny_model

SLOTS, QUEUE = 2, 1
LIMIT = SLOTS + QUEUE
MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    model = save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama")
    flags = ("--max-num-seqs", str(SLOTS), "--max-queue", str(QUEUE))
    with serve(str(model), *flags, log_dir=tmp_path_factory.mktemp("logs")) as sp:
        yield openai.OpenAI(base_url=sp.url + "/v1", api_key="none", max_retries=0, timeout=120)


def _assert_n_too_large(exc: openai.BadRequestError) -> None:
    err = exc.body
    assert exc.status_code == 400 and isinstance(err, dict), exc
    assert (err["param"], err["code"]) == ("n", "n_too_large")
    assert f"n={LIMIT + 1} " in err["message"] and f"at most {LIMIT}" in err["message"], err["message"]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_more_choices_than_the_server_can_hold_is_a_400(client: openai.OpenAI, stream: bool) -> None:
    with pytest.raises(openai.BadRequestError) as chat:
        client.chat.completions.create(
            model="llama", messages=MESSAGES, n=LIMIT + 1, max_tokens=2, stream=stream
        )
    _assert_n_too_large(chat.value)
    with pytest.raises(openai.BadRequestError) as completion:
        client.completions.create(model="llama", prompt="Colours:", n=LIMIT + 1, max_tokens=2, stream=stream)
    _assert_n_too_large(completion.value)


def test_exactly_the_limit_is_served(client: openai.OpenAI) -> None:
    """All choices admitted at once: SLOTS run, the rest wait in the queue, none is refused."""
    chat = client.chat.completions.create(
        model="llama", messages=MESSAGES, n=LIMIT, max_tokens=3, extra_body={"ignore_eos": True}
    )
    assert sorted(c.index for c in chat.choices) == list(range(LIMIT))
    assert all(c.finish_reason == "length" for c in chat.choices)
    assert chat.usage.completion_tokens == 3 * LIMIT
    completion = client.completions.create(model="llama", prompt="Colours:", n=LIMIT, max_tokens=2)
    assert sorted(c.index for c in completion.choices) == list(range(LIMIT))
