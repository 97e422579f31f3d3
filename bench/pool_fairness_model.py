"""What the pool burst scenario (bench/pool.py, ``burst``: fairness's first wave) can reach at best: a model, no Kafka.

The scenario: 4 workers, each admitting 6 requests (4 engine slots + 2 in the engine's queue);
globex's burst of 48 low requests (2x the pool's in-flight slots), first alone, then published
right after acme's 480 at the same moment. Its figure is globex's median queue time (submit to
admission) with the flood over alone, goal <= 2.

Model, per worker: admission is not preemptive; a request runs ``max_tokens x 0.148 s`` (the
simulated engine of the scenario: 27 tokens/s over 4 sequences) once it holds one of the 4
running places; acme's records arrive first and take the 6 admissions of an idle worker (as
measured: no globex request started within 1 s of the flood). Then each freed admission goes

- ``alternate``: to acme and globex in turn (what start-time fair queuing does with equal costs);
- ``newcomer``: to globex until it holds as many as acme (a concurrency-parity policy);
- ``globex_first``: to globex while it has any waiting (not fair: the lower bound of any policy
  that does not preempt acme's running requests).

Alone, half of globex's burst is admitted at once on the idle pool, so its median is the first
completion (~1.2 s); with the flood none is, and its median request needs several completions of
its worker. No policy comes near 2x, not even ``globex_first``: the goal assumes queue times dilate 2x with half the
pool, which holds for a burst much larger than the pool, not one of twice its in-flight slots.

    .venv/bin/python -m bench.pool_fairness_model
"""

from __future__ import annotations

import heapq
import random

TOKEN_S = 0.148
RUNNING, ADMITTED = 4, 6


def tokens_for(i: int, mean: int = 16) -> int:
    """As bench/pool.py: 0.5x .. 1.5x ``mean``."""
    lo, hi = max(1, mean // 2), mean + mean // 2
    return lo + (i * 7) % (hi - lo + 1)


def worker(globex: list[int], acme: list[int], policy: str) -> list[float]:
    """Admission times of globex's requests on one worker (all submitted at 0)."""
    waiting = {"g": list(globex), "a": list(acme)}
    held = {"g": 0, "a": 0}
    running: list[tuple[float, str]] = []
    queued: list[tuple[int, str]] = []
    admitted_at: list[float] = []
    turn = 0

    def choose(first: bool) -> str | None:
        nonlocal turn
        ready = [k for k in ("a", "g") if waiting[k]]
        if len(ready) < 2:
            return ready[0] if ready else None
        if first:
            return "a"  # acme's records reach the idle worker first
        if policy == "alternate":
            turn ^= 1
            return "g" if turn else "a"
        if policy == "newcomer":
            return "g" if held["g"] <= held["a"] else "a"
        return "g"

    def admit(now: float, first: bool = False) -> None:
        while sum(held.values()) < ADMITTED and (k := choose(first)) is not None:
            tokens = waiting[k].pop(0)
            held[k] += 1
            if k == "g":
                admitted_at.append(now)
            if len(running) < RUNNING:
                heapq.heappush(running, (now + tokens * TOKEN_S, k))
            else:
                queued.append((tokens, k))

    admit(0.0, first=True)
    while running:
        now, k = heapq.heappop(running)
        held[k] -= 1
        if queued:
            tokens, k2 = queued.pop(0)
            heapq.heappush(running, (now + tokens * TOKEN_S, k2))
        admit(now)
    return admitted_at


def main() -> None:
    rng = random.Random(3)
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731 (as bench.poolkit.queue_stats)
    for split in ([12, 12, 12, 12], [8, 12, 12, 16]):
        alone: list[float] = []
        flood: dict[str, list[float]] = {"alternate": [], "newcomer": [], "globex_first": []}
        start = 0
        for n in split:
            globex = [tokens_for(start + j) for j in range(n)]
            start += n
            acme = [tokens_for(rng.randrange(480)) for _ in range(120)]
            alone += worker(globex, [], "alternate")
            for policy, times in flood.items():
                times += worker(globex, acme, policy)
        base = median(alone)
        print(f"globex per worker {split}: alone p50 {base:.2f} s; with the flood: "
              + "; ".join(f"{p} {median(t):.2f} s = {median(t) / base:.1f}x" for p, t in flood.items()))


if __name__ == "__main__":
    main()
