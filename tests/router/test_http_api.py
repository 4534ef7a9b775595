"""The OpenAI-compatible HTTP API of a live router + 2 expert shards, through the official `openai` client
and raw HTTP (httpx) for the SSE framing and the error objects."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest
import torch

from dsv3.model import DeepSeekV3, ModelConfig
from dsv3.router import RouterClient
from dsv3.serving.ports import free_port
from dsv3.tokenizer import ByteTokenizer, render_chat

MAX_LENGTH = 128
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def cluster(spawn_module, tmp_path_factory):
    torch.manual_seed(3)
    directory = tmp_path_factory.mktemp("hf") / "tiny-v3"
    DeepSeekV3(ModelConfig.flavour("debug")).eval().save_pretrained(directory)
    shards = [spawn_module("dsv3.expert_shard", "--capacity", "64", "--device", "cpu") for _ in range(2)]
    http_port = free_port()
    router = spawn_module(
        "dsv3.router",
        "--model-dir",
        str(directory),
        "--device",
        "cpu",
        "--shards",
        ",".join(s.address for s in shards),
        "--max-length",
        str(MAX_LENGTH),
        "--http-port",
        str(http_port),
    )
    base = f"http://127.0.0.1:{http_port}"
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=60)
    with RouterClient(router.address, timeout_seconds=60) as grpc_client, httpx.Client(base_url=base) as raw:
        yield client, raw, grpc_client, shards


def test_models_lists_the_served_model(cluster) -> None:
    client, _, _, _ = cluster
    assert [m.id for m in client.models.list().data] == ["tiny-v3"]
    assert client.models.retrieve("tiny-v3").owned_by == "dsv3"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_completion_equals_grpc_generate_and_counts_usage(cluster) -> None:
    client, _, grpc_client, _ = cluster
    prompt = "def fib(n):"
    ids = TOK.encode(prompt)
    results = {}

    def over_grpc() -> None:  # at the same time as the HTTP request: one continuous batch serves both
        results["grpc"] = grpc_client.generate(ids, max_tokens=12)

    thread = threading.Thread(target=over_grpc)
    thread.start()
    out = client.completions.create(model="tiny-v3", prompt=prompt, max_tokens=12, temperature=0)
    thread.join(60)
    tokens = results["grpc"]
    assert out.choices[0].text == TOK.decode(tokens)
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(tokens)
    assert out.usage.total_tokens == len(ids) + len(tokens)
    assert out.choices[0].finish_reason == ("length" if len(tokens) == 12 else "stop")
    streamed = client.completions.create(
        model="tiny-v3", prompt=prompt, max_tokens=12, temperature=0, stream=True
    )
    chunks = [c.choices[0].text for c in streamed]
    assert "".join(chunks) == out.choices[0].text and len([c for c in chunks if c]) > 1
    by_ids = client.completions.create(model="tiny-v3", prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == out.choices[0].text


def test_chat_uses_the_template_and_streams_the_same_text(cluster) -> None:
    client, _, grpc_client, _ = cluster
    messages = [{"role": "system", "content": "terse"}, {"role": "user", "content": "hello"}]
    ids = TOK.encode(render_chat(TOK, messages))
    expected = TOK.decode(grpc_client.generate(ids, max_tokens=10))
    out = client.chat.completions.create(model="tiny-v3", messages=messages, max_tokens=10, temperature=0)
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == expected
    assert out.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(
        model="tiny-v3",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_stop_sequences_end_the_text_before_them(cluster) -> None:
    client, _, _, _ = cluster
    kwargs = dict(
        model="tiny-v3", prompt="import os\n", max_tokens=40, temperature=0, extra_body={"ignore_eos": True}
    )
    full = client.completions.create(**kwargs).choices[0].text
    spots = [k for k in range(3, len(full) - 2) if "\ufffd" not in full[k : k + 2]]
    assert spots, full
    stop = full[spots[0] : spots[0] + 2]
    for stream in (False, True):
        out = client.completions.create(**kwargs, stop=[stop, "never-there"], stream=stream)
        choices = [c.choices[0] for c in out] if stream else [out.choices[0]]
        assert "".join(c.text for c in choices) == full[: full.find(stop)]
        assert choices[-1].finish_reason == "stop"


def test_seeded_sampling_repeats(cluster) -> None:
    client, _, _, _ = cluster
    kwargs = dict(model="tiny-v3", prompt="x = ", max_tokens=16, temperature=1.0, top_p=0.9, seed=11)
    kwargs["extra_body"] = {"ignore_eos": True}
    a, b = (client.completions.create(**kwargs).choices[0].text for _ in range(2))
    c = client.completions.create(**{**kwargs, "seed": 12}).choices[0].text
    assert a == b and a != c


def test_sse_framing_over_raw_http(cluster) -> None:
    _, raw, _, _ = cluster
    body = {"model": "tiny-v3", "prompt": "a", "max_tokens": 5, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    with raw.stream("POST", "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = "".join(response.iter_text())
    events = text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") and "\n" not in e for e in events[:-1])
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(p["object"] == "text_completion" and p["model"] == "tiny-v3" for p in payloads)
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["prompt_tokens"] == 1


BAD = [
    ("/v1/completions", "{not json", "body"),
    ("/v1/completions", "[1, 2]", "body"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [1, 999]}, "prompt"),
    ("/v1/completions", {"prompt": "x" * MAX_LENGTH}, "prompt"),
    ("/v1/completions", {"prompt": "x" * 100, "max_tokens": 60}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": -3}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "a", "temperature": -0.5}, "temperature"),
    ("/v1/completions", {"prompt": "a", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "a", "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"prompt": "a", "n": 2}, "n"),
    ("/v1/completions", {"prompt": "a", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "a", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "a", "seed": 1.5}, "seed"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * MAX_LENGTH}]}, "messages"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
        "max_tokens",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "n": 3}, "n"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": -1},
        "max_completion_tokens",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "param"), BAD, ids=[f"{p[4:]}-{f}-{i}" for i, (p, _, f) in enumerate(BAD)]
)
def test_bad_requests_are_400_naming_the_field_and_serving_goes_on(cluster, path, body, param) -> None:
    _, raw, _, _ = cluster
    if isinstance(body, dict):
        body = json.dumps({"model": "tiny-v3", **body})
    response = raw.post(path, content=body, headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"].startswith(param)
    ok = raw.post("/v1/completions", json={"model": "tiny-v3", "prompt": "a", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_openai_client_sees_bad_requests_and_unknown_models(cluster) -> None:
    client, raw, _, _ = cluster
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny-v3", prompt="a", max_tokens=3, temperature=-1)
    assert err.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "a"}])
    assert err.value.code == "model_not_found"
    assert raw.get("/v1/nowhere").json()["error"]["message"].startswith("GET /v1/nowhere")


def test_health_and_metrics(cluster) -> None:
    _, raw, _, _ = cluster
    assert raw.get("/health").status_code == 200
    metrics = raw.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'dsv3_http_requests_total{endpoint="/v1/completions",status="400"}' in text
    generated = [line for line in text.splitlines() if line.startswith("dsv3_generation_tokens_total ")]
    assert generated and float(generated[0].split()[1]) > 0
    assert "dsv3_spec_draft_tokens_total" in text and "dsv3_requests_running" in text
    version = [line for line in text.splitlines() if line.startswith("dsv3_placement_version ")]
    assert version and float(version[0].split()[1]) >= 1  # the startup placement is version 1
    assert 'dsv3_placement_balancedness{when="now"}' in text


def test_503_once_no_replica_is_left(cluster) -> None:  # last: it kills the shards
    client, raw, _, shards = cluster
    for shard in shards:
        shard.kill()
    with pytest.raises(openai.InternalServerError) as err:  # 503: the step's shards are gone ...
        client.completions.create(model="tiny-v3", prompt="abc", max_tokens=4)
    assert err.value.status_code == 503 and err.value.code == "no_replica"
    health = raw.get("/health")  # ... and now known to be down: refused up front
    assert health.status_code == 503 and "no live expert shard" in health.json()["reason"]
    response = raw.post("/v1/completions", json={"model": "tiny-v3", "prompt": "abc"})
    assert response.status_code == 503 and response.json()["error"]["code"] == "no_replica"
