"""The official `openai` Python client against `nanochat serve` (run by tests/serve.rs).

Usage: python3 openai_client.py BASE_URL   (e.g. http://127.0.0.1:8000/v1)
Prints one JSON object with what the client saw; exits non-zero if the client raised unexpectedly.
"""
import json
import sys

import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="not-needed", max_retries=0)
messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]

models = [m.id for m in client.models.list()]
completion = client.chat.completions.create(model=models[0], messages=messages, temperature=0, max_tokens=8)
stream = client.chat.completions.create(
    model=models[0], messages=messages, temperature=0, max_tokens=8, stream=True,
    stream_options={"include_usage": True},
)
pieces, finish, usage = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage.model_dump()
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
        if choice.finish_reason:
            finish = choice.finish_reason

try:
    client.chat.completions.create(model=models[0], messages=messages, logit_bias={"1": 5})
    refused = None
except openai.BadRequestError as e:
    refused = {"status": e.status_code, "message": e.message}

print(json.dumps({
    "models": models,
    "content": completion.choices[0].message.content,
    "finish_reason": completion.choices[0].finish_reason,
    "usage": completion.usage.model_dump(),
    "stream_content": "".join(pieces),
    "stream_finish_reason": finish,
    "stream_usage": usage,
    "refused": refused,
}))
