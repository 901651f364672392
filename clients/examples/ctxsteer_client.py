"""ctxsteer's own client: `ask` with a document, typed steering, streaming, /tokenize and typed errors.
Run `make serve` first, then: python clients/examples/ctxsteer_client.py
(CTXSTEER_BASE_URL and CTXSTEER_API_KEY are read from the environment, as the CLI does.)"""

from ctxsteer.clients import APIError, Client, Steering

document = "The meeting was moved from Tuesday to Friday at 3pm, in room 12."

with Client() as client:  # http://127.0.0.1:8000/v1 unless CTXSTEER_BASE_URL says otherwise
    # The document and the question become one user turn, which is what gets steered.
    answer = client.ask("When is the meeting?", context=document, strength=3, max_tokens=30, temperature=0)
    print(answer.text)
    print(answer.usage, answer.steering, sep="\n")

    # Streaming; steer only the document (a span), at alpha = 0.25 (= strength 4).
    messages = [{"role": "user", "content": f"{document}\n\nWhich room is it in?"}]
    with client.stream_chat(
        messages, Steering(alpha=0.25, spans=[document]), max_tokens=30, temperature=0
    ) as stream:
        for chunk in stream:
            print(chunk.text, end="", flush=True)
    print(f"\n[{stream.finish_reason}; {stream.steering}]")

    # Which prompt tokens would be steered, without generating anything.
    tokens = client.tokenize(messages, steering=Steering(spans=[document]))
    print(f"{tokens.steered_tokens} of {tokens.count} prompt tokens steered: {tokens.steered_spans}")

    # Invalid steering fails before sending (SteeringError); server errors carry the OpenAI fields.
    try:
        client.chat(messages, Steering(layers=[999]), max_tokens=5)
    except APIError as e:
        print(f"rejected: status={e.status} param={e.param} code={e.code}: {e.message}")
