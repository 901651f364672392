"""The official `openai` SDK against ctxsteer: steering rides in `extra_body`, the report comes back as an
extra field of the response. Run `make serve` first, then: python clients/examples/openai_sync.py"""

import os

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("CTXSTEER_BASE_URL", "http://127.0.0.1:8000/v1"),
    api_key=os.environ.get("CTXSTEER_API_KEY", "none"),  # the SDK insists on a key; ctxsteer needs none
)
model = client.models.list().data[0].id

document = "The meeting was moved from Tuesday to Friday at 3pm, in room 12."
question = "When is the meeting?"
for strength in (1, 3):  # 1 = off; higher = the model attends more to the user's turn
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"{document}\n\n{question}"}],
        max_tokens=30,
        temperature=0,
        extra_body={"steering": {"strength": strength}},  # or {"steering_strength": 3}
    )
    report = r.model_extra["steering"]  # what the server applied
    print(f"strength {strength}: {r.choices[0].message.content!r}")
    print(f"  steered {report['steered_tokens']} of {report['prompt_tokens']} prompt tokens")
