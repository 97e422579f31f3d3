"""The simulated engine: batching, step costs, priority, cancellation, speed, render/check_length.

Pure asyncio on a fake clock: the engine's ``sleep`` advances the clock by the step's modelled
time and yields once, so nothing here depends on wall-clock timing.
"""

from __future__ import annotations

import asyncio

import pytest

from schemas.messages import ChatMessage, ErrorCode, Request, SamplingParams, utc_now
from worker.engine import Engine, EngineDead, RequestRejected
from worker.settings import WorkerSettings
from worker.simulated import FILLER, SimParams, SimulatedEngine


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def engine(**params: object) -> tuple[SimulatedEngine, FakeClock]:
    clock = FakeClock()
    return SimulatedEngine(SimParams(**params), sleep=clock.sleep, clock=clock), clock  # type: ignore[arg-type]


def request(rid: str, max_tokens: int = 4, prompt: str = "x" * 40) -> Request:
    return Request(request_id=rid, tenant_id="acme", priority="low", prompt=prompt,
                   params=SamplingParams(max_tokens=max_tokens), submitted_at=utc_now())


def submit(eng: SimulatedEngine, rid: str, max_tokens: int = 4, priority: int = 0,
           prompt: str = "x" * 40) -> asyncio.Task:
    req = request(rid, max_tokens, prompt)
    return asyncio.get_running_loop().create_task(eng.generate(req, eng.render(req), priority))


async def until(condition, turns: int = 10_000) -> None:
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


def join_order(eng: SimulatedEngine) -> list[str]:
    return [rid for step in eng.steps for rid in step.joined]


async def test_at_most_max_num_seqs_run_and_the_rest_join_as_slots_free() -> None:
    eng, _ = engine(max_num_seqs=4)
    lengths = {f"r{i}": 3 + 2 * i for i in range(8)}  # r0..r3 finish at steps 3, 5, 7, 9
    tasks = [submit(eng, rid, n) for rid, n in lengths.items()]
    completions = await asyncio.gather(*tasks)

    assert max(step.batch for step in eng.steps) == 4
    joined_at = {rid: step.index for step in eng.steps for rid in step.joined}
    finished_at = {rid: step.index for step in eng.steps for rid in step.finished}
    assert all(joined_at[f"r{i}"] == 1 for i in range(4))
    for first, second in zip(["r0", "r1", "r2", "r3"], ["r4", "r5", "r6", "r7"]):
        assert joined_at[second] == finished_at[first] + 1  # a second-four request takes the slot just freed
    for rid, completion in zip(lengths, completions):
        assert completion.completion_tokens == lengths[rid] == finished_at[rid] - joined_at[rid] + 1
        assert completion.finish_reason == "length" and completion.simulated
        assert completion.text == FILLER * lengths[rid]
        assert completion.first_token_at is not None and completion.first_token_at <= completion.finished_at
    assert eng.running == eng.waiting == 0
    assert eng.tokens_generated == sum(lengths.values())


async def test_a_bigger_batch_makes_a_longer_step() -> None:
    eng, clock = engine(max_num_seqs=8, decode_base_ms=5.0, decode_per_seq_ms=0.5, prefill_ms_per_token=0.0)
    await asyncio.gather(*[submit(eng, f"r{i}", max_tokens=1 + i) for i in range(8)])

    by_batch = {step.batch: step.duration_s for step in eng.steps}
    assert sorted(by_batch) == list(range(1, 9))
    assert all(by_batch[b] < by_batch[b + 1] for b in range(1, 8))
    assert by_batch[8] == pytest.approx((5.0 + 0.5 * 8) / 1000)
    assert clock.sleeps == pytest.approx([step.duration_s for step in eng.steps])  # on schedule: slept the model
    assert eng.modelled_s == pytest.approx(clock.now)


async def test_prefill_is_paid_in_the_step_a_sequence_joins() -> None:
    eng, _ = engine(max_num_seqs=2, decode_base_ms=5.0, decode_per_seq_ms=0.0, prefill_ms_per_token=0.01)
    prompt = "y" * 4000  # 1000 approximate tokens
    await asyncio.gather(submit(eng, "a", max_tokens=3, prompt=prompt), submit(eng, "b", max_tokens=3, prompt=prompt))

    first, *rest = eng.steps
    assert first.joined == ("a", "b") and first.prompt_tokens == 2000
    assert first.duration_s == pytest.approx((5.0 + 0.01 * 2000) / 1000)
    assert [step.duration_s for step in rest] == pytest.approx([0.005, 0.005])


async def test_the_queue_serves_lower_priority_numbers_first_then_arrival() -> None:
    eng, _ = engine(max_num_seqs=1)
    blocker = submit(eng, "blocker", max_tokens=5, priority=2)
    await until(lambda: eng.running == 1)
    tasks = [submit(eng, rid, max_tokens=1, priority=p)
             for rid, p in [("low-1", 2), ("high-1", 0), ("med-1", 1), ("high-2", 0), ("low-2", 2)]]
    await asyncio.gather(blocker, *tasks)

    assert join_order(eng) == ["blocker", "high-1", "high-2", "med-1", "low-1", "low-2"]


async def test_cancelling_a_running_request_frees_its_slot_for_the_next() -> None:
    eng, _ = engine(max_num_seqs=1)
    long = submit(eng, "long", max_tokens=1_000)
    waiting = submit(eng, "next", max_tokens=2)
    await until(lambda: eng.step_count >= 3)
    long.cancel()
    steps_at_cancel = eng.step_count
    completion = await waiting

    with pytest.raises(asyncio.CancelledError):
        await long
    joined_at = {rid: step.index for step in eng.steps for rid in step.joined}
    # step steps_at_cancel + 1 was in flight (its batch fixed when it began); the next step admits "next"
    assert joined_at["next"] == steps_at_cancel + 2
    assert completion.completion_tokens == 2
    assert not any("long" in step.finished for step in eng.steps)
    assert eng.running == eng.waiting == 0


async def test_cancelling_a_queued_request_removes_it() -> None:
    eng, _ = engine(max_num_seqs=1)
    first = submit(eng, "first", max_tokens=3)
    queued = submit(eng, "queued", max_tokens=3)
    last = submit(eng, "last", max_tokens=3)
    await until(lambda: eng.running == 1 and eng.waiting == 2)
    queued.cancel()
    await until(lambda: eng.waiting == 1)
    await asyncio.gather(first, last)

    assert queued.cancelled()
    assert join_order(eng) == ["first", "last"]


async def test_the_engine_idles_when_nothing_runs_and_restarts_on_demand() -> None:
    eng, clock = engine()
    await submit(eng, "a", max_tokens=2)
    await until(lambda: eng._driver is None)
    steps, now = eng.step_count, clock.now
    for _ in range(10):
        await asyncio.sleep(0)
    assert (eng.step_count, clock.now) == (steps, now)  # no steps while idle

    await submit(eng, "b", max_tokens=2)
    assert eng.step_count == steps + 2


async def test_speed_scales_every_modelled_time() -> None:
    async def run(speed: float) -> list[float]:
        eng, _ = engine(max_num_seqs=2, speed=speed)
        await asyncio.gather(*[submit(eng, f"r{i}", max_tokens=2 + i, prompt="z" * 400) for i in range(4)])
        return [step.duration_s for step in eng.steps]

    normal, double, half = await run(1.0), await run(2.0), await run(0.5)
    assert len(normal) == len(double) == len(half)
    assert double == pytest.approx([d / 2 for d in normal])
    assert half == pytest.approx([d * 2 for d in normal])
    with pytest.raises(ValueError):
        SimParams(speed=0)


def test_defaults_follow_the_cited_h100_measurements() -> None:
    p = SimParams()
    assert p.step_s(1, 0) * 1000 == pytest.approx(6.48, abs=0.1)  # TPOT at concurrency 1
    assert p.step_s(16, 0) * 1000 == pytest.approx(10.94, abs=0.1)  # TPOT at concurrency 16
    assert p.step_s(1, 4096) * 1000 == pytest.approx(45, abs=2)  # TTFT of a lone 4K prompt


def test_render_approximates_tokens_without_a_tokenizer() -> None:
    eng, _ = engine()
    assert len(eng.render(request("a", prompt="abcd" * 10))) == 10
    assert len(eng.render(request("a", prompt="abcde"))) == 2
    assert len(eng.render(request("a", prompt="é"))) == 1  # 2 UTF-8 bytes
    chat = Request(request_id="c", tenant_id="acme", priority="low", submitted_at=utc_now(),
                   messages=[ChatMessage(role="system", content="s" * 8), ChatMessage(role="user", content="u" * 4)])
    assert len(eng.render(chat)) == 3 + (4 + 2) + (4 + 1)
    assert all(isinstance(t, int) for t in eng.render(chat))


def test_check_length_is_the_real_engines() -> None:
    eng, _ = engine(max_model_len=100)
    real = Engine(llm=None, tokenizer=None, max_model_len=100)
    eng.check_length(90, 10)
    for prompt_tokens, max_tokens, code in [(100, 1, ErrorCode.prompt_too_long), (90, 11, ErrorCode.invalid_request)]:
        with pytest.raises(RequestRejected) as sim_error:
            eng.check_length(prompt_tokens, max_tokens)
        with pytest.raises(RequestRejected) as real_error:
            real.check_length(prompt_tokens, max_tokens)
        assert sim_error.value.code == real_error.value.code == code
        assert sim_error.value.message == real_error.value.message


async def test_shutdown_fails_pending_requests_and_marks_the_engine_dead() -> None:
    eng, _ = engine(max_num_seqs=1)
    running, queued = submit(eng, "a", max_tokens=1_000), submit(eng, "b")
    await until(lambda: eng.step_count >= 1)
    assert not eng.dead
    eng.shutdown()

    assert eng.dead
    for task in (running, queued):
        with pytest.raises(EngineDead):
            await task
    with pytest.raises(EngineDead):
        await eng.generate(request("c"), [1], 0)


def test_settings_select_and_tune_the_simulated_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERQ_ENGINE", "simulated")
    monkeypatch.setenv("TIERQ_SIMULATED__SPEED", "0.5")
    monkeypatch.setenv("TIERQ_SIMULATED__DECODE_PER_SEQ_MS", "1.5")
    settings = WorkerSettings(max_num_seqs=4, max_model_len=2048)
    eng = SimulatedEngine.from_settings(settings)

    assert settings.engine == "simulated"
    assert eng.params == SimParams(decode_per_seq_ms=1.5, speed=0.5, max_num_seqs=4, max_model_len=2048)
    assert eng.max_model_len == 2048


def test_the_command_line_maps_engine_and_speed(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from worker.cli import engine_options, worker_settings

    monkeypatch.setenv("TIERQ_SIMULATED__DECODE_BASE_MS", "9")
    parser = argparse.ArgumentParser(parents=[engine_options()])
    settings = worker_settings(parser.parse_args(["--engine", "simulated", "--sim-speed", "2"]))
    assert settings.engine == "simulated"
    assert (settings.simulated.speed, settings.simulated.decode_base_ms) == (2.0, 9.0)
    assert worker_settings(parser.parse_args([])).engine == "vllm"


async def test_n_outputs_and_logprobs_are_filler_marked_simulated() -> None:
    eng, _clock = engine()
    req = Request(request_id="n3", tenant_id="acme", priority="low", prompt="x" * 40,
                  params=SamplingParams(max_tokens=3, n=3, logprobs=2,
                                        response_format={"type": "json_object"}), submitted_at=utc_now())
    completion = await eng.generate(req, eng.render(req), 0)
    assert completion.simulated and completion.completion_tokens == 9
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert all(c.text == FILLER * 3 and c.logprobs is None for c in completion.choices)
    single = await eng.generate(request("one"), eng.render(request("one")), 0)
    assert single.choices == () and single.completion_tokens == 4
