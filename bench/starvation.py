"""Starvation: a high load that saturates the engine plus a low trickle, with aging on and
off, in the same run. With aging on, a low request's wait is bounded by about
``aging_step_s`` x the number of bands it must climb; with aging off it waits out the load.

    .venv/bin/python -m bench.starvation --seconds 60   # writes bench/results/starvation-cpu.{json,png}
"""

from __future__ import annotations

import asyncio
import time

from bench.common import Phase, doc, figure_path, parser, pct, stack, topology, write
from schemas.messages import Band


async def run_phase(engine, bootstrap, args, aging: bool) -> dict:
    step = args.step
    topo = topology(bootstrap, medium={"aging_step_s": step}, low={"aging_step_s": step})
    async with Phase(engine, bootstrap, topo, args.slots, aging=aging) as phase:
        highs: list[str] = []
        lows: list[str] = []
        start = time.monotonic()
        next_low = start
        while time.monotonic() - start < args.seconds:
            # closed loop: keep at least 2x the engine's slots of high work waiting in the worker,
            # so the engine is saturated with high requests the whole time
            if phase.worker.policy.waiting_by_band()[Band.high] < 2 * args.slots:
                highs += await asyncio.to_thread(phase.publish, [doc("acme", "high", args.high_tokens)
                                                                  for _ in range(2 * args.slots)])
            if time.monotonic() >= next_low:
                lows += await asyncio.to_thread(phase.publish, [doc("globex", "low", 8)])
                next_low += args.low_interval
            await asyncio.sleep(0.02)
        high_replies = await phase.collect("acme", expect=len(highs))
        low_replies = {r.request_id: r for r in await phase.collect("globex", expect=len(lows))}
    load_end = max(r.timing.dequeued_at for r in high_replies)
    low = [low_replies[i] for i in lows]
    waits = [r.timing.queue_ms / 1000 for r in low]
    return {
        "aging": aging, "high_requests": len(highs), "low_requests": len(low),
        "low_wait_s_p50": pct(waits, 50), "low_wait_s_p99": pct(waits, 99), "low_wait_s_max": round(max(waits), 2),
        "low_served_during_load": sum(1 for r in low if r.timing.dequeued_at < load_end),
        "low_served_as": {band: sum(1 for r in low if r.served_as and r.served_as.value == band)
                          for band in ("high", "medium", "low")},
        "_replies": low,
    }


async def main_async(args) -> None:
    with stack(args) as (engine, bootstrap):
        on = await run_phase(engine, bootstrap, args, aging=True)
        off = await run_phase(engine, bootstrap, args, aging=False)
    result = {
        "slots": args.slots, "load_seconds": args.seconds, "aging_step_s": args.step,
        "expected_bound_s": args.step * 2,
        "aging_on": {k: v for k, v in on.items() if not k.startswith("_")},
        "aging_off": {k: v for k, v in off.items() if not k.startswith("_")},
    }
    write("starvation", args.tag, result)
    plot(on["_replies"], off["_replies"], args)


def plot(on, off, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for replies, label, color in ((on, "aging on", "tab:green"), (off, "aging off", "tab:red")):
        if replies:
            t0 = min(r.timing.submitted_at for r in replies)
            ax.plot([(r.timing.submitted_at - t0).total_seconds() for r in replies],
                    [r.timing.queue_ms / 1000 for r in replies], "o-", color=color, label=label)
    ax.axhline(args.step * 2, color="gray", linestyle="--", label=f"bound: 2 x aging step ({args.step * 2:g} s)")
    ax.set_xlabel("low request submitted at (s)")
    ax.set_ylabel("low request wait (s)")
    ax.set_title(f"tierq starvation: low trickle under {args.seconds:g} s of saturating high load")
    ax.legend()
    fig.tight_layout()
    fig.savefig(figure_path("starvation", args.tag), dpi=110)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--seconds", type=float, default=60.0, help="duration of the high load")
    p.add_argument("--step", type=float, default=5.0, help="aging_step_s of medium and low for the run")
    p.add_argument("--high-tokens", type=int, default=32)
    p.add_argument("--low-interval", type=float, default=2.0)
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
