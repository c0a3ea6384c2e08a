"""The official OpenAI Python client against MoltBot's /v1: listing models, a plain and a streamed completion
(the same greedy answer both ways, with usage), errors raised as the client's own exception types, and structured
output (`response_format` with a JSON Schema, and `json_object`), and the whole tool flow, plain and streamed: tools →
`tool_calls` → a tool message → the final answer.
Run by tests/tests/openai_client.rs with the gateway's base URL, and the model to use when it is not the default."""

import sys

import openai
from openai import OpenAI

client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="not-needed-on-loopback", max_retries=0)
MODEL = sys.argv[2] if len(sys.argv) > 2 else "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "What is 2+2?"}]

models = client.models.list()
assert any(m.id == MODEL for m in models.data), models
assert client.models.retrieve(MODEL).id == MODEL
try:
    client.models.retrieve("gpt-9")
    raise AssertionError("an unknown model was found")
except openai.NotFoundError as e:
    assert e.code == "model_not_found", e

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

# Tool calling: the forced call comes back as `tool_calls` with arguments valid against the function's schema; the
# client runs it and sends the result as a tool message; the model answers in text.
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather at a place",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["location", "unit"],
            "additionalProperties": False,
        },
    },
}
QUESTION = [{"role": "user", "content": "How warm is it in Paris?"}]
FORCED = {"type": "function", "function": {"name": "get_weather"}}


def check_call(call):
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_"), call
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"location", "unit"} and isinstance(arguments["location"], str), arguments
    assert arguments["unit"] in ("celsius", "fahrenheit") and len(arguments["location"]) <= 30, arguments


def answer_after(call):
    history = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "clear"})},
    ]
    final = client.chat.completions.create(
        model=MODEL, messages=history, tools=[WEATHER], tool_choice="none", max_tokens=16, temperature=0
    )
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls, final
    assert final.choices[0].finish_reason in ("stop", "length"), final


called = client.chat.completions.create(
    model=MODEL, messages=QUESTION, tools=[WEATHER], tool_choice=FORCED, max_tokens=48, temperature=0
)
assert called.choices[0].finish_reason == "tool_calls", called
assert called.choices[0].message.content is None, called
assert len(called.choices[0].message.tool_calls) == 1, called
check_call(called.choices[0].message.tool_calls[0])
answer_after(called.choices[0].message.tool_calls[0])

stream = client.chat.completions.create(
    model=MODEL, messages=QUESTION, tools=[WEATHER], tool_choice=FORCED, max_tokens=48, temperature=0, stream=True
)
calls, finish, text = {}, None, ""
for chunk in stream:
    delta = chunk.choices[0].delta
    text += delta.content or ""
    for part in delta.tool_calls or []:
        seen = calls.setdefault(part.index, {"id": part.id, "name": "", "arguments": ""})
        seen["name"] += part.function.name or ""
        seen["arguments"] += part.function.arguments or ""
    finish = chunk.choices[0].finish_reason or finish
assert finish == "tool_calls" and text == "" and len(calls) == 1, (finish, text, calls)
streamed = openai.types.chat.ChatCompletionMessageToolCall(
    id=calls[0]["id"], type="function", function={"name": calls[0]["name"], "arguments": calls[0]["arguments"]}
)
check_call(streamed)
assert streamed.function.arguments == called.choices[0].message.tool_calls[0].function.arguments, "greedy both ways"
answer_after(streamed)

try:
    client.chat.completions.create(model=MODEL, messages=QUESTION, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}})
    raise AssertionError("a tool_choice naming no tool must fail")
except openai.BadRequestError as e:
    assert e.body["param"] == "tool_choice", e.body
try:
    client.chat.completions.create(model=MODEL, messages=QUESTION + [{"role": "tool", "content": "{}"}])
    raise AssertionError("a tool message without tool_call_id must fail")
except openai.BadRequestError as e:
    assert e.body["param"] == "messages[1].tool_call_id", e.body

print("openai client: ok")
