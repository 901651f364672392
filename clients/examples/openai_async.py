"""The async `openai` SDK: several strengths of one question, concurrently (the server batches them).
Run `make serve` first, then: python clients/examples/openai_async.py"""

import asyncio
import os

from openai import AsyncOpenAI


async def main() -> None:
    client = AsyncOpenAI(
        base_url=os.environ.get("CTXSTEER_BASE_URL", "http://127.0.0.1:8000/v1"),
        api_key=os.environ.get("CTXSTEER_API_KEY", "none"),
    )
    model = (await client.models.list()).data[0].id
    messages = [
        {"role": "system", "content": "Answer in one short sentence."},  # not steered
        {"role": "user", "content": "Memo: the office moved to Graz in May.\n\nWhere is the office now?"},
    ]
    strengths = (1, 1.5, 2, 4)
    answers = await asyncio.gather(
        *(
            client.chat.completions.create(
                model=model,
                messages=messages,
                max_tokens=30,
                temperature=0,
                extra_body={"steering": {"strength": s}},
            )
            for s in strengths
        )
    )
    for s, r in zip(strengths, answers, strict=True):
        steered = r.model_extra["steering"]["steered_tokens"]
        print(f"strength {s} ({steered} prompt tokens steered): {r.choices[0].message.content!r}")
    await client.close()


asyncio.run(main())
