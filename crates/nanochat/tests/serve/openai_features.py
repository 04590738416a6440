"""Runs a plan of requests with the official `openai` Python client against `nanochat serve` and
prints what the client saw, as one JSON list (run by tests/serve_api.rs, which knows the answers).

Usage: python3 openai_features.py BASE_URL PLAN_JSON
PLAN_JSON is a list of {"call": "chat" | "completion" | "retrieve" | "models", "args": {...}} with
the keyword arguments of the client call (`stream: true` streams it); an optional "api_key".
For each call the output holds either the reassembled result or {"error": {...}} with the
exception's class, status and body: the client's own parsing is what is under test.
"""
import json
import sys

import openai


def logprob_entries(content):
    return [
        {
            "token": e.token,
            "logprob": e.logprob,
            "bytes": e.bytes,
            "top": [[t.token, t.logprob] for t in (e.top_logprobs or [])],
        }
        for e in content or []
    ]


def usage_of(usage):
    if usage is None:
        return None
    out = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
           "total_tokens": usage.total_tokens, "cached_tokens": None}
    details = getattr(usage, "prompt_tokens_details", None)
    if details is not None:
        out["cached_tokens"] = details.cached_tokens
    return out


def chat(client, args):
    if not args.get("stream"):
        r = client.chat.completions.create(**args)
        return {
            "object": r.object,
            "choices": [
                {
                    "index": c.index,
                    "content": c.message.content,
                    "finish_reason": c.finish_reason,
                    "logprobs": None if c.logprobs is None else logprob_entries(c.logprobs.content),
                }
                for c in r.choices
            ],
            "usage": usage_of(r.usage),
        }
    choices, usage, objects = {}, None, set()
    for chunk in client.chat.completions.create(**args):
        objects.add(chunk.object)
        if chunk.usage is not None:
            usage = usage_of(chunk.usage)
        for c in chunk.choices:
            seen = choices.setdefault(c.index, {"index": c.index, "content": "", "finish_reason": None,
                                                "logprobs": None, "role": None})
            if c.delta.role:
                seen["role"] = c.delta.role
            if c.delta.content:
                seen["content"] += c.delta.content
            if c.logprobs is not None:
                seen["logprobs"] = (seen["logprobs"] or []) + logprob_entries(c.logprobs.content)
            if c.finish_reason:
                seen["finish_reason"] = c.finish_reason
    return {"objects": sorted(objects), "choices": [choices[i] for i in sorted(choices)], "usage": usage}


def completion(client, args):
    def lp(logprobs):
        if logprobs is None:
            return None
        return {"tokens": logprobs.tokens, "token_logprobs": logprobs.token_logprobs,
                "top_logprobs": logprobs.top_logprobs, "text_offset": logprobs.text_offset}

    if not args.get("stream"):
        r = client.completions.create(**args)
        return {
            "object": r.object,
            "choices": [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                         "logprobs": lp(c.logprobs)} for c in r.choices],
            "usage": usage_of(r.usage),
        }
    choices, usage = {}, None
    for chunk in client.completions.create(**args):
        if chunk.usage is not None:
            usage = usage_of(chunk.usage)
        for c in chunk.choices:
            seen = choices.setdefault(c.index, {"index": c.index, "text": "", "finish_reason": None, "logprobs": None})
            seen["text"] += c.text
            if c.logprobs is not None:
                old = seen["logprobs"] or {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                new = lp(c.logprobs)
                seen["logprobs"] = {k: old[k] + (new[k] or []) for k in old}
            if c.finish_reason:
                seen["finish_reason"] = c.finish_reason
    return {"choices": [choices[i] for i in sorted(choices)], "usage": usage}


def run(base_url, step):
    client = openai.OpenAI(base_url=base_url, api_key=step.get("api_key", "not-needed"), max_retries=0)
    call, args = step["call"], step.get("args", {})
    try:
        if call == "chat":
            return chat(client, args)
        if call == "completion":
            return completion(client, args)
        if call == "retrieve":
            m = client.models.retrieve(args["model"])
            return {"id": m.id, "object": m.object, "owned_by": m.owned_by}
        if call == "models":
            return {"ids": [m.id for m in client.models.list()]}
        raise ValueError(f"unknown call {call}")
    except openai.APIStatusError as e:
        return {"error": {"class": type(e).__name__, "status": e.status_code, "body": e.body}}


def main():
    base_url, plan = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps([run(base_url, step) for step in plan]))


main()
