"""MTP speculative decoding: greedy output equals plain greedy token for token (random and trained debug
models, in a continuous batch and through router + 2 shards); with sampling, a chi-square test cannot tell
the output from the target distribution and does tell a deliberately wrong acceptance rule."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch

from dsv3.corpus import encode
from dsv3.demo import DemoSettings, run_demo
from dsv3.generation import generate
from dsv3.model import DeepSeekV3, ModelConfig
from dsv3.router import RouterClient
from dsv3.router.engine import Engine, SamplingParams, probabilities
from dsv3.serving.ports import free_port

PROMPTS = ["def __init__(self", "import os\nimport ", "    return ", "class Foo:\n    ", "x"]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Many tiny forwards: with two threads on a busy 2-core box OpenMP's spinning makes them ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory) -> Path:
    """The debug flavour after a few steps on the default corpus (MTP loss included): its drafts hit."""
    directory = tmp_path_factory.mktemp("trained") / "demo"
    settings = DemoSettings(steps=20, batch=4, seq_len=64, new_tokens=1, output_dir=directory)
    run_demo(settings, log=lambda *_: None)
    return directory


def _greedy(model: DeepSeekV3, prompt: list[int], new: int) -> list[int]:
    return generate(model, torch.tensor([prompt]), new)[0, len(prompt) :].tolist()


def _run_engine(model, submissions, max_batch=3, max_length=96, speculative=True, accept=None, late=()):
    """Tokens of each (prompt, params); `late` ones join after two decode steps."""

    async def main():
        engine = Engine(model, max_batch, max_length, ThreadPoolExecutor(1), speculative=speculative)
        if accept is not None:
            engine.speculator.accept = accept
        runner = asyncio.create_task(engine.run())
        jobs = [engine.submit(p, params) for p, params in submissions]
        tasks = [asyncio.create_task(_collect(engine, j)) for j in jobs]
        while late and engine.steps < 2:
            await asyncio.sleep(0.005)
        jobs += [engine.submit(p, params) for p, params in late]
        tasks += [asyncio.create_task(_collect(engine, j)) for j in jobs[len(tasks) :]]
        outputs = await asyncio.wait_for(asyncio.gather(*tasks), 120)
        runner.cancel()
        return outputs, jobs, engine

    return asyncio.run(main())


async def _collect(engine: Engine, job) -> list[int]:
    return [t async for t in engine.tokens(job)]


@pytest.mark.parametrize("trained", [False, True], ids=["random", "trained"])
def test_greedy_speculative_equals_plain_greedy_in_a_continuous_batch(
    debug_model, trained_dir, trained
) -> None:
    model = DeepSeekV3.from_pretrained(trained_dir).eval() if trained else debug_model
    prompts = [encode(p) for p in PROMPTS]
    lengths = [12, 5, 9, 14, 6]
    expected = [_greedy(model, p, n) for p, n in zip(prompts, lengths, strict=True)]
    subs = [(p, SamplingParams(n)) for p, n in zip(prompts, lengths, strict=True)]
    outputs, jobs, engine = _run_engine(model, subs[:4], late=subs[4:])
    assert outputs == expected
    assert engine.drafted == sum(j.drafted for j in jobs) > 0
    if trained:  # drafts hit, and requests accept different numbers of them
        assert engine.accepted > engine.drafted // 2
        assert engine.steps < sum(lengths) - len(lengths)  # fewer decode steps than plain decoding needs
        assert len({j.accepted for j in jobs}) > 1


TINY = dataclasses.replace(ModelConfig.flavour("debug"), vocab_size=8, bos_token_id=0, eos_token_id=1)


def _wrong_residual(logits_V, draft, params, generator, best=None):
    """A classic bug: on rejection, draw from the target p instead of the residual max(0, p - q)."""
    p_V = probabilities(logits_V, params)
    p_V = p_V / p_V.sum()
    if float(torch.rand((), generator=generator)) < float(p_V[draft.token] / draft.probs_V[draft.token]):
        return True, draft.token
    return False, int(torch.multinomial(p_V, 1, generator=generator))


def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    stat = ((counts.double() - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc(torch.tensor((len(probs) - 1) / 2.0), stat / 2))


def test_sampled_speculation_keeps_the_target_distribution() -> None:
    torch.manual_seed(0)
    model = DeepSeekV3(TINY).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(std=0.3)  # distributions far from uniform, draft q unlike target p
    prompt = [1, 2, 3]
    with torch.no_grad():  # the exact target of the 2nd new token (the first one a draft decides)
        p1 = model(torch.tensor([prompt])).logits[0, -1].softmax(-1)
        p2 = sum(p1[t] * model(torch.tensor([[*prompt, t]])).logits[0, -1].softmax(-1) for t in range(8))
    subs = [(prompt, SamplingParams(3, temperature=1.0, seed=s, ignore_eos=True)) for s in range(2000)]
    results = {}
    for name, rule in (("right", None), ("wrong", _wrong_residual)):
        outputs, _, engine = _run_engine(model, subs, max_batch=64, max_length=16, accept=rule)
        second = torch.bincount(torch.tensor([o[1] for o in outputs]), minlength=8)
        results[name] = (_chi_square_p(second, p2), engine.accepted / engine.drafted)
    assert results["right"][0] > 1e-3, results  # cannot tell the output from the target ...
    assert results["wrong"][0] < 1e-9, results  # ... but does tell the wrong rule
    assert 0.1 < results["right"][1] < 0.9  # both branches of the rule ran


@pytest.fixture(scope="module")
def spec_cluster(spawn_module, trained_dir):
    shards = [spawn_module("dsv3.expert_shard", "--capacity", "48", "--device", "cpu") for _ in range(2)]
    http_port = free_port()
    common = ("--model-dir", str(trained_dir), "--device", "cpu", "--max-length", "128")
    router = spawn_module(
        "dsv3.router",
        *common,
        "--shards",
        ",".join(s.address for s in shards),
        "--speculative",
        "on",
        "--http-port",
        str(http_port),
    )
    with RouterClient(router.address, timeout_seconds=60) as client:
        yield client, f"http://127.0.0.1:{http_port}/v1"


def test_router_and_shards_speculate_with_the_mtp_experts_on_the_shards(spec_cluster, trained_dir) -> None:
    client, _ = spec_cluster
    held = {(s.layer, s.expert) for shard in client.placement().shards for s in shard.slots}
    assert {layer for layer, _ in held} == {1, 2, 3}  # layer 3: the MTP block's experts
    model = DeepSeekV3.from_pretrained(trained_dir).eval()
    prompts = [encode(p) for p in PROMPTS[:3]]
    expected = [_greedy(model, p, 20) for p in prompts]
    finals: list = [None] * len(prompts)
    tokens: list = [None] * len(prompts)

    def run(i: int) -> None:  # concurrently: one continuous batch
        replies = list(client.replies(prompts[i], max_tokens=20, ignore_eos=True))
        tokens[i], finals[i] = [r.token for r in replies], replies[-1]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert tokens == expected
    assert all(f.last and f.finish_reason == "length" for f in finals)
    assert all(0 < f.accepted_draft_tokens <= f.draft_tokens < 20 for f in finals)


def test_http_usage_reports_accepted_drafts(spec_cluster) -> None:
    _, base_url = spec_cluster
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=60)
    out = client.completions.create(
        model="demo", prompt="def ", max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
    )
    details = out.usage.completion_tokens_details
    assert out.usage.completion_tokens == 24
    assert details.accepted_prediction_tokens > 0 and details.rejected_prediction_tokens >= 0
    assert details.accepted_prediction_tokens + details.rejected_prediction_tokens < 24
    import httpx

    metrics = httpx.get(base_url.removesuffix("/v1") + "/metrics").text
    accepted = [line for line in metrics.splitlines() if line.startswith("dsv3_spec_accepted_tokens_total ")]
    assert float(accepted[0].split()[1]) >= details.accepted_prediction_tokens


def test_speculation_is_on_by_default_for_mtp_checkpoints_and_flags_turn_it_off(
    monkeypatch, debug_config
) -> None:
    from dsv3.router.config import RouterConfig
    from dsv3.serving.flags import parse_config

    for name in ("DSV3_SPECULATIVE", "DSV3_HTTP_PORT"):
        monkeypatch.delenv(name, raising=False)
    base = ["--model-dir", "m", "--shards", "a:1", "--device", "cpu"]
    default = parse_config(RouterConfig, base)
    assert default.speculative is True and default.http_port == 8000
    assert parse_config(RouterConfig, [*base, "--speculative", "off"]).speculative is False
    monkeypatch.setenv("DSV3_HTTP_PORT", "8123")
    monkeypatch.setenv("DSV3_SPECULATIVE", "off")
    from_env = parse_config(RouterConfig, base)
    assert (from_env.http_port, from_env.speculative) == (8123, False)
    without_mtp = DeepSeekV3(debug_config.replace(num_nextn_predict_layers=0)).eval()
    assert Engine(without_mtp, 2, 16, ThreadPoolExecutor(1), speculative=True).speculator is None


def test_speculation_fills_the_context_exactly_and_stops_inside_an_accepted_pair(trained_dir) -> None:
    model = DeepSeekV3.from_pretrained(trained_dir).eval()
    prompt = encode("    return self.")
    new = 32 - len(prompt)  # prompt + new tokens == the context: the last step must not draft past it
    expected = _greedy(model, prompt, new)
    subs = [(prompt, SamplingParams(new)), (prompt, SamplingParams(new, temperature=0.8, seed=3))]
    outputs, _, engine = _run_engine(model, subs, max_length=32)
    assert outputs[0] == expected and len(outputs[1]) == new and engine.accepted > 0
    stop = expected[5]
    outputs, jobs, _ = _run_engine(model, [(prompt, SamplingParams(new, stop=(stop,)))], max_length=32)
    assert outputs[0] == expected[: expected.index(stop) + 1] and jobs[0].finish_reason == "stop"
