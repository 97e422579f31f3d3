"""Fairness: two tenants in one band at 10:1 load, against the small tenant alone, in the
same run. Reports each tenant's share of completions while both were backlogged and the
small tenant's queue time relative to its one-tenant baseline.

    .venv/bin/python -m bench.fairness     # writes bench/results/fairness-cpu.{json,png}
"""

from __future__ import annotations

import asyncio

from bench.common import Phase, doc, figure_path, parser, ratio, stack, summary, topology, write

NO_AGING = {"medium": {"aging_step_s": None}, "low": {"aging_step_s": None}}


async def main_async(args) -> None:
    small_n, big_n = args.small, args.small * args.factor
    with stack(args) as (engine, bootstrap):
        async with Phase(engine, bootstrap, topology(bootstrap, **NO_AGING), args.slots) as alone:
            ids = alone.publish([doc("globex", "low", args.tokens) for _ in range(small_n)])
            baseline = await alone.collect("globex", expect=len(ids))
        async with Phase(engine, bootstrap, topology(bootstrap, **NO_AGING), args.slots) as both:
            big = both.publish([doc("acme", "low", args.tokens) for _ in range(big_n)])
            small = both.publish([doc("globex", "low", args.tokens) for _ in range(small_n)])
            big_replies = await both.collect("acme", expect=len(big))
            small_replies = await both.collect("globex", expect=len(small))
    small_done = max(r.timing.dequeued_at for r in small_replies)
    big_during = sum(1 for r in big_replies if r.timing.dequeued_at <= small_done)
    result = {
        "slots": args.slots, "load": {"acme": big_n, "globex": small_n}, "max_tokens": args.tokens,
        "share_while_both_backlogged": {
            "acme": round(big_during / (big_during + small_n), 3), "globex": round(small_n / (big_during + small_n), 3)},
        "globex_alone": summary(baseline), "globex_with_acme": summary(small_replies), "acme": summary(big_replies),
        "preemptions": both.worker.preemptions,  # acme requests taken back for globex (TIERQ_PREEMPT)
    }
    result["globex_queue_ratio_vs_alone"] = {
        "p50": ratio(result["globex_with_acme"]["queue_ms_p50"], result["globex_alone"]["queue_ms_p50"]),
        "mean": ratio(result["globex_with_acme"]["queue_ms_mean"], result["globex_alone"]["queue_ms_mean"]),
    }
    write("fairness", args.tag, result)
    plot(baseline, small_replies, big_replies, args.tag)


def plot(baseline, small, big, tag) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    t0 = min(r.timing.submitted_at for r in big + small)
    for replies, label, color in ((big, "acme (10x)", "tab:blue"), (small, "globex (1x)", "tab:orange")):
        times = sorted((r.timing.dequeued_at - t0).total_seconds() for r in replies)
        ax.plot(times, range(1, len(times) + 1), label=label, color=color)
    b0 = min(r.timing.submitted_at for r in baseline)
    times = sorted((r.timing.dequeued_at - b0).total_seconds() for r in baseline)
    ax.plot(times, range(1, len(times) + 1), "--", label="globex alone", color="tab:orange", alpha=0.6)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("requests admitted")
    ax.set_title("tierq fairness: two tenants at 10:1 in one band")
    ax.legend()
    fig.tight_layout()
    fig.savefig(figure_path("fairness", tag), dpi=110)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--small", type=int, default=20, help="requests of the small tenant")
    p.add_argument("--factor", type=int, default=10, help="the big tenant sends this many times more")
    p.add_argument("--tokens", type=int, default=32)
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
