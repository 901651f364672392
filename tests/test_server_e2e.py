"""`ctxsteer serve` as users run it (subprocess, tiny model from a local HF dir) with the openai SDK."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from server_process import ServerProcess, serve
from tiny import save_tiny_model

STRENGTHS = [1.0, 1.5, 3.0, 1.0, 2.0, 5.0, 1.25, 8.0]


def _messages(i: int) -> list[dict]:
    doc = " ".join(f"fact{i}-{j} is number {j * (i + 3)}." for j in range(6 + i))
    return [{"role": "user", "content": f"Context: {doc}\nQuestion: what is fact{i}-3?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    with serve(model_dir, "--max-num-seqs", "8", log_dir=tmp_path_factory.mktemp("logs")) as sp:
        yield sp


def _sdk(sp: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=sp.url + "/v1", api_key="none", max_retries=0, timeout=60)


def _greedy(
    client: openai.OpenAI, msgs: list[dict], strength: float, max_tokens: int = 16
) -> list[tuple[str, float]]:
    """Greedy tokens with their logprobs (the tiny model's text alone is often degenerate)."""
    r = client.chat.completions.create(
        model="llama",
        messages=msgs,
        max_tokens=max_tokens,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"steering": {"strength": strength}, "ignore_eos": True},
    )
    return [(t.token, t.logprob) for t in r.choices[0].logprobs.content]


def _close(a: list[tuple[str, float]], b: list[tuple[str, float]], tol: float = 1e-4) -> bool:
    return [t for t, _ in a] == [t for t, _ in b] and all(
        abs(x - y) <= tol for (_, x), (_, y) in zip(a, b, strict=True)
    )


def test_sdk_chat_stream_and_steering_report(server: ServerProcess) -> None:
    client = _sdk(server)
    r = client.chat.completions.create(
        model="llama",
        messages=_messages(0),
        max_tokens=8,
        temperature=0,
        extra_body={"steering": {"strength": 2}},
    )
    steering = r.model_extra["steering"]
    assert steering["strength"] == 2 and steering["alpha"] == 0.5 and steering["layers"] == "all"
    assert 0 < steering["steered_tokens"] < steering["prompt_tokens"] == r.usage.prompt_tokens
    chunks = list(
        client.chat.completions.create(
            model="llama",
            messages=_messages(0),
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"steering": {"strength": 2}},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_concurrent_mixed_strengths_equal_solo(server: ServerProcess) -> None:
    client = _sdk(server)
    solo = [_greedy(client, _messages(i), s) for i, s in enumerate(STRENGTHS)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda a: _greedy(client, _messages(a[0]), a[1]), enumerate(STRENGTHS)))
    assert all(_close(a, b) for a, b in zip(together, solo, strict=True))
    # The strengths really differ in effect (same prompt, strength 1 vs 8).
    assert not _close(_greedy(client, _messages(0), 1.0), _greedy(client, _messages(0), 8.0), 1e-3)


def test_async_sdk(server: ServerProcess) -> None:
    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        rs = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model="llama",
                    messages=_messages(i),
                    max_tokens=6,
                    temperature=0,
                    extra_body={"steering_strength": 2},
                )
                for i in range(4)
            )
        )
        return [r.choices[0].message.content for r in rs]

    texts = asyncio.run(main())
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)


@pytest.fixture()
def one_slot_server(model_dir, tmp_path) -> Iterator[ServerProcess]:
    with serve(model_dir, "--max-num-seqs", "1", "--max-queue", "0", log_dir=tmp_path) as sp:
        yield sp


def test_disconnect_frees_the_slot(one_slot_server: ServerProcess) -> None:
    body = {"model": "llama", "messages": _messages(1), "max_tokens": 300, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=one_slot_server.url, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            next(lines)
            next(lines)
        # With one slot and no queue, a 200 here proves the slot was freed (else: 429).
        for _ in range(50):
            resp = http.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
            if resp.status_code == 200:
                break
            time.sleep(0.05)
        assert resp.status_code == 200


def test_overload_gets_429_and_accepted_requests_complete(model_dir, tmp_path) -> None:
    with serve(model_dir, "--max-num-seqs", "2", "--max-queue", "2", log_dir=tmp_path) as sp:
        body = {
            "model": "llama",
            "messages": _messages(2),
            "max_tokens": 300,  # long enough that the 16 requests overlap
            "ignore_eos": True,
            "temperature": 0,
        }

        def post(_: int) -> httpx.Response:
            return httpx.post(sp.url + "/v1/chat/completions", json=body, timeout=120)

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(post, range(16)))
        ok = [r for r in results if r.status_code == 200]
        rejected = [r for r in results if r.status_code == 429]
        assert len(ok) + len(rejected) == 16 and ok and rejected
        assert all(r.headers.get("retry-after") for r in rejected)
        assert all(r.json()["error"]["type"] for r in rejected)
        assert all(r.json()["usage"]["completion_tokens"] == 300 for r in ok)
        with pytest.raises(openai.RateLimitError):
            with ThreadPoolExecutor(16) as pool:
                for f in [pool.submit(_greedy, _sdk(sp), _messages(2), 1.0, 300) for _ in range(16)]:
                    f.result()


def test_sigterm_drains_in_flight_stream(model_dir, tmp_path) -> None:
    with serve(model_dir, log_dir=tmp_path) as sp:
        body = {
            "model": "llama",
            "messages": _messages(3),
            "max_tokens": 300,
            "stream": True,
            "ignore_eos": True,
        }
        with (
            httpx.Client(base_url=sp.url, timeout=60) as http,
            http.stream("POST", "/v1/chat/completions", json=body) as r,
        ):
            lines = r.iter_lines()
            next(lines)
            sp.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert '"finish_reason":"length"' in rest[-2].replace(" ", "") or any(
            '"finish_reason":"length"' in x.replace(" ", "") for x in rest
        )
        assert sp.proc.wait(30) == 0  # a clean drain is a clean exit (uvicorn alone re-raises SIGTERM: 143)
