"""The official OpenAI Python client against MoltBot's /v1: listing models, a plain and a streamed completion
(the same greedy answer both ways, with usage), errors raised as the client's own exception types, and structured
output (`response_format` with a JSON Schema, and `json_object`).
Run by tests/tests/openai_client.rs with the gateway's base URL as the only argument."""

import sys

import openai
from openai import OpenAI

client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="not-needed-on-loopback", max_retries=0)
MODEL = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "What is 2+2?"}]

models = client.models.list()
assert any(m.id == MODEL for m in models.data), models

plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
choice = plain.choices[0]
assert choice.message.role == "assistant" and choice.message.content, plain
assert choice.finish_reason in ("stop", "length"), plain
assert plain.usage.prompt_tokens > 0 and plain.usage.completion_tokens > 0, plain.usage

stream = client.chat.completions.create(
    model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
)
parts, finish, usage = [], None, None
for chunk in stream:
    if chunk.choices:
        parts.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    if chunk.usage:
        usage = chunk.usage
assert "".join(parts) == choice.message.content, (parts, choice.message.content)
assert finish == choice.finish_reason, finish
assert usage is not None and usage.completion_tokens == plain.usage.completion_tokens, usage

try:
    client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    raise AssertionError("an unknown model must fail")
except openai.NotFoundError as e:
    assert "gpt-9" in str(e), e
try:
    client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=7)
    raise AssertionError("a bad temperature must fail")
except openai.BadRequestError as e:
    assert e.body["param"] == "temperature", e.body

# Structured output: the answer is JSON valid against the schema (the engine masks every token that would leave
# it), and `json_object` gives a JSON object.
import json

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
structured = client.chat.completions.create(
    model=MODEL,
    messages=[{"role": "user", "content": "Invent a person."}],
    max_tokens=24,
    temperature=0,
    response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
)
person = json.loads(structured.choices[0].message.content)
assert set(person) == {"name", "age"} and isinstance(person["age"], int) and 0 <= person["age"] <= 120, person
assert structured.choices[0].finish_reason == "stop", structured
anything = client.chat.completions.create(
    model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0, response_format={"type": "json_object"}
)
assert anything.choices[0].message.content.lstrip().startswith("{"), anything

print("openai client: ok")
