"""Priority isolation: a steady trickle of high requests over a low backlog of >= 10x the
engine's capacity, against the same trickle on an idle system and on a FIFO baseline (the
same requests all on one topic, no priority), in the same run on the same engine.

    .venv/bin/python -m bench.priority            # writes bench/results/priority-cpu.{json,png}
"""

from __future__ import annotations

import asyncio
import time

from bench.common import Phase, doc, figure_path, parser, ratio, stack, summary, topology, write

NO_AGING = {"medium": {"aging_step_s": None}, "low": {"aging_step_s": None}}


async def trickle(phase: Phase, seconds: float, interval: float, tenant: str, priority: str,
                  max_tokens: int) -> list[str]:
    ids: list[str] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        ids += await asyncio.to_thread(phase.publish, [doc(tenant, priority, max_tokens)])
        await asyncio.sleep(interval)
    return ids


async def run_phase(engine, bootstrap, args, backlog: int, fifo: bool = False) -> dict:
    """fifo: the 'high' requests go to the low topic as the backlog's own tenant, so they are
    served in arrival order behind it, as on a single FIFO queue."""
    topo = topology(bootstrap, **NO_AGING)
    async with Phase(engine, bootstrap, topo, args.slots) as phase:
        lows = phase.publish([doc("globex", "low", args.low_tokens) for _ in range(backlog)]) if backlog else []
        if lows:
            await phase.collect("globex", expect=1)  # the engine is busy with the backlog
        tenant, priority = ("globex", "low") if fifo else ("acme", "high")
        highs = await trickle(phase, args.seconds, args.interval, tenant, priority, args.high_tokens)
        replies = {r.request_id: r for r in await phase.collect(tenant, expect=len(highs) + (len(lows) if fifo else 0))}
        if not fifo and lows:
            replies.update({r.request_id: r for r in await phase.collect("globex", expect=len(lows))})
    return {"high": [replies[i] for i in highs], "low": [replies[i] for i in lows]}


async def main_async(args) -> None:
    capacity = args.slots + 2
    backlog = args.backlog or 20 * capacity
    with stack(args) as (engine, bootstrap):
        idle = await run_phase(engine, bootstrap, args, 0)
        prio = await run_phase(engine, bootstrap, args, backlog)
        fifo = await run_phase(engine, bootstrap, args, backlog, fifo=True)
    phases = {"idle": idle, "priority": prio, "fifo": fifo}
    result = {
        "slots": args.slots, "capacity": capacity, "low_backlog": backlog, "low_max_tokens": args.low_tokens,
        "high_trickle": {"seconds": args.seconds, "interval_s": args.interval, "max_tokens": args.high_tokens},
        "high": {name: summary(p["high"]) for name, p in phases.items()},
    }
    result["backlog_outlasted_trickle"] = {
        name: max(r.timing.finished_at for r in p["low"]) > max(r.timing.submitted_at for r in p["high"])
        for name, p in phases.items() if p["low"]}
    base = result["high"]["idle"]
    result["ratios_vs_idle"] = {
        name: {k: ratio(result["high"][name][k], base[k]) for k in ("queue_ms_p50", "queue_ms_p99", "e2e_ms_p50",
                                                                    "e2e_ms_p99")}
        for name in ("priority", "fifo")
    }
    write("priority", args.tag, result)
    plot(phases, args.tag)


def plot(phases: dict, tag: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    for ax, (name, phase) in zip(axes, phases.items()):
        every = phase["high"] + phase["low"]
        if not every:
            continue
        t0 = min(r.timing.submitted_at for r in every)
        for band, color in (("low", "tab:blue"), ("high", "tab:red")):
            replies = phase[band]
            ax.scatter([(r.timing.submitted_at - t0).total_seconds() for r in replies],
                       [r.timing.e2e_ms / 1000 for r in replies], s=8, color=color,
                       label=f"{'high trickle' if band == 'high' else 'low backlog'} ({len(replies)})")
        ax.set_title(name)
        ax.set_xlabel("submitted at (s)")
        ax.set_yscale("log")
        ax.legend()
    axes[0].set_ylabel("end-to-end latency (s)")
    fig.suptitle("tierq priority isolation: high trickle over a low backlog")
    fig.tight_layout()
    fig.savefig(figure_path("priority", tag), dpi=110)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--backlog", type=int, help="low backlog size (default 20x capacity)")
    p.add_argument("--low-tokens", type=int, default=400)
    p.add_argument("--high-tokens", type=int, default=16)
    p.add_argument("--seconds", type=float, default=10.0, help="length of the high trickle")
    p.add_argument("--interval", type=float, default=0.25, help="seconds between high requests")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
