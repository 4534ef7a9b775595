"""The continuous-batching engine without gRPC, on an in-process model (all experts local)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from dsv3.generation import generate
from dsv3.router.engine import Engine, RequestError, SamplingParams, sample


async def _collect(engine: Engine, request) -> list[int]:
    return [t async for t in engine.tokens(request)]


def test_requests_join_and_leave_between_steps(debug_model) -> None:
    prompts = [torch.randint(0, 320, (n,)).tolist() for n in (4, 13, 7, 21, 2)]
    lengths = [9, 3, 6, 5, 8]
    expected = [
        generate(debug_model, torch.tensor([p]), n)[0, len(p) :].tolist()
        for p, n in zip(prompts, lengths, strict=True)
    ]

    async def main() -> tuple[list[list[int]], int]:
        engine = Engine(debug_model, max_batch=3, max_length=64, executor=ThreadPoolExecutor(1))
        runner = asyncio.create_task(engine.run())
        first = [engine.submit(p, SamplingParams(n)) for p, n in zip(prompts[:4], lengths[:4], strict=True)]
        tasks = [asyncio.create_task(_collect(engine, r)) for r in first]
        await asyncio.sleep(0)  # the fourth waits for a free slot (max_batch=3) ...
        while engine.steps < 2:
            await asyncio.sleep(0.01)
        late = engine.submit(prompts[4], SamplingParams(lengths[4]))  # ... and one joins mid-decode
        tasks.append(asyncio.create_task(_collect(engine, late)))
        outputs = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        runner.cancel()
        return outputs, engine.steps

    outputs, steps = asyncio.run(main())
    assert outputs == expected
    # one decode forward per step for every active request: far fewer than one per token
    assert steps < sum(lengths) - len(lengths)


def test_validation_names_the_field(debug_model) -> None:
    engine = Engine(debug_model, max_batch=2, max_length=16, executor=ThreadPoolExecutor(1))
    cases = [
        ([], SamplingParams(2), "prompt_ids"),
        ([320], SamplingParams(2), "prompt_ids"),
        ([1], SamplingParams(0), "max_tokens"),
        ([1] * 10, SamplingParams(7), "max_tokens"),
        ([1], SamplingParams(2, temperature=-1), "temperature"),
        ([1], SamplingParams(2, top_p=0), "top_p"),
        ([1], SamplingParams(2, top_k=-1), "top_k"),
    ]
    for prompt, params, field in cases:
        with pytest.raises(RequestError) as err:
            engine.validate(prompt, params)
        assert err.value.field == field


def test_top_p_keeps_the_nucleus_only() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = torch.Generator().manual_seed(0)
    draws = {sample(logits, SamplingParams(1, temperature=1.0, top_p=0.7), gen) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 covers 0.7; the tail is never drawn
    draws = {sample(logits, SamplingParams(1, temperature=1.0, top_k=3), gen) for _ in range(300)}
    assert draws == {0, 1, 2}


def test_eos_ends_a_request_unless_ignored(debug_model) -> None:
    prompt = [5, 6, 7, 8]
    plain = generate(debug_model, torch.tensor([prompt]), 8)[0, len(prompt) :].tolist()
    eos = plain[3]  # pretend the 4th greedy token is the tokenizer's EOS
    cut = plain.index(eos) + 1

    async def main() -> list[tuple[list[int], str | None]]:
        engine = Engine(debug_model, max_batch=2, max_length=32, executor=ThreadPoolExecutor(1), eos_id=eos)
        runner = asyncio.create_task(engine.run())
        stopped = engine.submit(prompt, SamplingParams(8))
        ignoring = engine.submit(prompt, SamplingParams(8, ignore_eos=True))
        out = []
        for request in (stopped, ignoring):
            events = [e async for e in engine.events(request)]
            assert [e.last for e in events] == [False] * (len(events) - 1) + [True]
            out.append(([e.token for e in events], request.finish_reason))
        runner.cancel()
        return out

    (a, reason_a), (b, reason_b) = asyncio.run(main())
    assert (a, reason_a) == (plain[:cut], "stop")
    assert (b, reason_b) == (plain, "length")


def test_decode_steps_run_on_decode_threads_prefills_on_all(debug_model) -> None:
    from dsv3.serving import threads

    seen: list[tuple[int, int]] = []  # (tokens in the step, torch threads it ran with)
    hook = debug_model.lm_head.register_forward_hook(
        lambda module, args, out: seen.append((args[0].shape[0], torch.get_num_threads()))
    )
    prompts = [[5, 6, 7], [8, 9]]
    expected = [generate(debug_model, torch.tensor([p]), 4)[0, len(p) :].tolist() for p in prompts]
    seen.clear()

    async def main() -> list[list[int]]:
        executor = ThreadPoolExecutor(1, initializer=threads.use_for_compute)
        engine = Engine(debug_model, max_batch=2, max_length=16, executor=executor, decode_threads=1)
        runner = asyncio.create_task(engine.run())
        requests = [engine.submit(p, SamplingParams(4)) for p in prompts]
        out = await asyncio.wait_for(asyncio.gather(*(_collect(engine, r) for r in requests)), 60)
        runner.cancel()
        return out

    try:
        assert asyncio.run(main()) == expected
    finally:
        hook.remove()
    assert seen[0][1] == threads.compute_threads()  # the prefill: all of them
    assert {n for _, n in seen[1:]} == {1}  # every decode step: decode_threads
    assert len(seen) == 4  # one prefill, three decode steps for both requests together
