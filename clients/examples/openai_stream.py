"""Streaming with the `openai` SDK: tokens as they arrive; usage and the steering report on the last chunk.
Run `make serve` first, then: python clients/examples/openai_stream.py"""

import os

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("CTXSTEER_BASE_URL", "http://127.0.0.1:8000/v1"),
    api_key=os.environ.get("CTXSTEER_API_KEY", "none"),
)
stream = client.chat.completions.create(
    model=client.models.list().data[0].id,
    messages=[{"role": "user", "content": "Memo: lunch is at 12:30 today.\n\nWhen is lunch?"}],
    max_tokens=40,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
    # Steer only the memo (a span of the user turn), not the question.
    extra_body={"steering": {"strength": 2, "spans": ["Memo: lunch is at 12:30 today."]}},
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
    if chunk.usage:  # the last chunk
        steering = (chunk.model_extra or {}).get("steering")
        print(f"\n[{chunk.usage.completion_tokens} tokens; steering {steering}]")
