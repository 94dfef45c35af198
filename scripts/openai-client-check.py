#!/usr/bin/env python3
"""Drives `ultramoe serve` with the official OpenAI Python client: a completion, a chat
completion, both streamed, seeded sampling that repeats, a stop sequence, and the
client's view of errors (unknown model, bad max_tokens). Prints one line per check and
exits non-zero on the first failure.

Usage: openai-client-check.py BASE_URL MODEL
"""
import sys

import openai

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)


def check(name, ok, detail=""):
    if not ok:
        print(f"FAIL {name}: {detail}")
        sys.exit(1)
    print(f"ok   {name}")


models = [m.id for m in client.models.list()]
check("models.list names the model", models == [model], models)

c = client.completions.create(model=model, prompt="the router sends", max_tokens=12, temperature=0)
check("completion", c.choices[0].finish_reason in ("stop", "length") and c.usage.completion_tokens >= 1, c)
greedy = c.choices[0].text

parts = []
finish = None
for chunk in client.completions.create(model=model, prompt="the router sends", max_tokens=12, temperature=0, stream=True):
    parts.append(chunk.choices[0].text)
    finish = chunk.choices[0].finish_reason or finish
check("streamed completion equals the whole one", "".join(parts) == greedy and finish == c.choices[0].finish_reason, (parts, greedy))

chat = client.chat.completions.create(
    model=model,
    messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "route each token"}],
    max_tokens=10,
    temperature=0,
)
reply = chat.choices[0].message.content
check("chat completion", chat.choices[0].message.role == "assistant" and chat.usage.prompt_tokens > 4, chat)

parts = []
roles = []
for chunk in client.chat.completions.create(
    model=model,
    messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "route each token"}],
    max_tokens=10,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
):
    if chunk.choices:
        roles += [chunk.choices[0].delta.role] if chunk.choices[0].delta.role else []
        parts.append(chunk.choices[0].delta.content or "")
    elif chunk.usage:
        usage = chunk.usage
check("streamed chat equals the whole one", "".join(parts) == reply and roles == ["assistant"], (parts, reply))
check("streamed chat reports usage", usage.completion_tokens == chat.usage.completion_tokens, usage)

a = client.completions.create(model=model, prompt="each expert", max_tokens=16, temperature=1.0, top_p=0.9, seed=42)
b = client.completions.create(model=model, prompt="each expert", max_tokens=16, temperature=1.0, top_p=0.9, seed=42)
check("a seed repeats its sample", a.choices[0].text == b.choices[0].text, (a.choices[0].text, b.choices[0].text))

if len(greedy) > 3:
    stop = greedy[2:4]
    s = client.completions.create(model=model, prompt="the router sends", max_tokens=12, temperature=0, stop=[stop])
    check("a stop sequence ends the text before it", s.choices[0].text == greedy[: greedy.find(stop)] and s.choices[0].finish_reason == "stop", (s.choices[0].text, greedy, stop))

try:
    client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    check("unknown model refused", False, "accepted")
except openai.NotFoundError as e:
    check("unknown model refused (404)", "no-such-model" in str(e), e)

try:
    client.completions.create(model=model, prompt="x", max_tokens=-5)
    check("negative max_tokens refused", False, "accepted")
except openai.BadRequestError as e:
    check("negative max_tokens refused (400, names the field)", e.body and e.body.get("param") == "max_tokens", e.body)

print("all OpenAI client checks passed")
