"""`tierq demo`'s output without an engine: the table and the sample answers on fake replies, and the
redirection that keeps child processes' output (vLLM's engine core) off the terminal."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta

from schemas.messages import Reply, utc_now
from tierq.demo import engine_output, report, samples, table, workload


def fake_replies(docs, text=lambda doc: "An answer."):
    now = utc_now()
    replies = []
    for n, doc in enumerate(docs):
        queue_ms = {"high": 100, "medium": 1000, "low": 5000}[doc["priority"]] + n
        replies.append(Reply.model_validate({
            "request_id": f"r{n}", "tenant_id": doc["tenant_id"], "status": "ok", "text": text(doc),
            "finish_reason": "stop", "priority": doc["priority"], "served_as": doc["priority"],
            "timing": {"submitted_at": now, "finished_at": now + timedelta(milliseconds=queue_ms + 300),
                       "queue_ms": queue_ms, "e2e_ms": queue_ms + 300},
            "metadata": doc["metadata"]}))
    return replies


def test_workload_mixes_short_questions_and_longer_tasks_in_every_band(base_topology):
    docs = workload(base_topology, low=6, medium=4, high=4)
    assert [d["priority"] for d in docs] == ["low"] * 6 + ["medium"] * 4 + ["high"] * 4
    for band in ("low", "medium", "high"):
        mine = [d for d in docs if d["priority"] == band]
        assert {d["params"]["max_tokens"] for d in mine} == {32, 64}
        assert all(d["messages"][-1]["role"] == "user" and d["messages"][0]["role"] == "system" for d in mine)
    assert docs[0]["messages"][-1]["content"] != docs[6]["messages"][-1]["content"]  # bands start apart
    assert all(base_topology.tenants[d["tenant_id"]].max_priority.rank <= ["high", "medium", "low"].index(d["priority"])
               for d in docs)


def test_table_has_one_row_per_band_with_percentiles(base_topology):
    docs = workload(base_topology, low=5, medium=3, high=2)
    lines = table(fake_replies(docs)).splitlines()
    assert lines[0].split() == ["band", "count", "ok", "queue", "p50", "queue", "p95", "e2e", "p50", "e2e", "p95",
                                "promoted"]
    assert [line.split()[:3] for line in lines[1:]] == [["high", "2", "2"], ["medium", "3", "3"], ["low", "5", "5"]]
    assert lines[1].split()[3] == "108ms"  # p50 of 108 and 109, inclusive method


def test_samples_show_questions_and_truncated_answers_per_band(base_topology):
    docs = workload(base_topology, low=5, medium=3, high=2)
    long_answer = "word " * 200
    text = samples(fake_replies(docs, lambda d: long_answer if d["params"]["max_tokens"] > 32 else "Paris.\x1b[2J"),
                   docs, width=80, answer_chars=120)
    lines = text.splitlines()
    assert [line for line in lines if not line.startswith(" ")] == ["high:", "medium:", "low:"]
    asked = [line for line in lines if "asked:" in line]
    assert len(asked) == 2 + 3 + 3
    assert "\x1b" not in text  # control characters never reach the terminal
    assert all(len(line) <= 80 for line in lines)
    answers = " ".join(line.strip() for line in lines if not line.endswith(":") and "asked:" not in line)
    assert "Paris." in answers and "…" in answers
    assert all(line.strip() != "…" for line in lines)  # the ellipsis stays with the last word
    assert answers.count("word") <= 3 * 24  # three long answers, each cut to 120 characters


def test_samples_show_error_replies(base_topology):
    docs = workload(base_topology, low=1, medium=0, high=0)
    failed = Reply.model_validate({
        "request_id": "r0", "tenant_id": docs[0]["tenant_id"], "status": "error", "priority": "low",
        "error": {"code": "engine_error", "message": "boom"}, "metadata": docs[0]["metadata"]})
    assert "[error: engine_error: boom]" in samples([failed], docs)


def test_report_puts_the_table_then_the_samples(base_topology):
    docs = workload(base_topology, low=2, medium=2, high=2)
    text = report(fake_replies(docs), docs)
    assert text.index("band") < text.index("Sample answers") < text.index("high:")


def test_engine_output_sends_child_process_output_to_the_log(tmp_path, capfd):
    log = tmp_path / "state" / "demo.log"
    with engine_output(log, verbose=False) as console:
        subprocess.run([sys.executable, "-c", "import sys; print('engine says hi'); print('warn', file=sys.stderr)"],
                       check=True)
        os.write(1, b"from this process\n")
        print("to the terminal", file=console.out)
        assert console.log_path == log
    assert log.read_text().split() == ["engine", "says", "hi", "warn", "from", "this", "process"]
    assert "to the terminal" in capfd.readouterr().out
