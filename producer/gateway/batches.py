"""The OpenAI Batch API on top of the topics: upload a JSONL file, create a batch, poll it,
download the results.

Each batch line becomes a request with the deterministic id ``batch.<hex>.<line>`` and its
``custom_id`` in metadata, published at the batch priority (low by default) and paced by
the tenant's quota (waiting, not refusing). Replies are matched back by request id.
Files and batch state are JSON files under the batch directory; after a restart the
gateway re-reads the reply topics (``replay=beginning``) and finishes open batches.
Batches belong to the gateway instance (its directory) that created them.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from pathlib import Path
from typing import Any

import orjson
import structlog

from producer.batchfile import OPENAI_URLS, from_openai_batch_line
from producer.gateway.openai_api import completion_body, reply_error
from producer.gateway.bridge import KafkaBridge
from producer.client import DeliveryError
from producer.quota import QuotaExceeded
from schemas.codec import MessageError
from schemas.messages import Band, Reply

log = structlog.get_logger("tierq.gateway.batches")

BATCH_PREFIX = "batch_"
#: Batch state saved every this many published lines (resume point after a crash).
SAVE_EVERY = 500


def _write_json(path: Path, document: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps(document))
    os.replace(tmp, path)


def request_id_for(batch_id: str, line: int) -> str:
    return f"batch.{batch_id.removeprefix(BATCH_PREFIX)}.{line}"


def batch_id_of(request_id: str) -> str | None:
    parts = request_id.split(".")
    return BATCH_PREFIX + parts[1] if len(parts) == 3 and parts[0] == "batch" else None


class BatchError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class BatchService:
    def __init__(self, root: Path, bridge: KafkaBridge, priority: Band, model_name: str):
        self.files_dir = root / "files"
        self.batches_dir = root / "batches"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.batches_dir.mkdir(parents=True, exist_ok=True)
        self.bridge = bridge
        self.priority = priority
        self.model_name = model_name
        self.batches: dict[str, dict[str, Any]] = {}
        self.results: dict[str, dict[int, Reply]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        bridge.reply_hooks.append(self._on_reply)
        for path in sorted(self.batches_dir.glob("batch_*.json")):
            batch = orjson.loads(path.read_bytes())
            self.batches[batch["id"]] = batch
            self.results[batch["id"]] = {}

    # ---- files -----------------------------------------------------------------------

    def save_file(self, owner: str, filename: str, purpose: str, content: bytes) -> dict[str, Any]:
        file_id = "file-" + secrets.token_hex(12)
        (self.files_dir / f"{file_id}.jsonl").write_bytes(content)
        meta = {"id": file_id, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "owner": owner}
        _write_json(self.files_dir / f"{file_id}.json", meta)
        return meta

    def file_meta(self, owner: str, file_id: str) -> dict[str, Any]:
        path = self.files_dir / f"{file_id}.json"
        if not file_id.startswith("file-") or not path.exists():
            raise BatchError(404, f"no file {file_id!r}")
        meta = orjson.loads(path.read_bytes())
        if meta["owner"] != owner:
            raise BatchError(404, f"no file {file_id!r}")
        return meta

    def file_content(self, owner: str, file_id: str) -> bytes:
        self.file_meta(owner, file_id)
        return (self.files_dir / f"{file_id}.jsonl").read_bytes()

    # ---- batches ---------------------------------------------------------------------

    def create(self, owner: str, input_file_id: str, endpoint: str, completion_window: str,
               metadata: dict[str, Any] | None) -> dict[str, Any]:
        meta = self.file_meta(owner, input_file_id)
        if meta["purpose"] != "batch":
            raise BatchError(400, f"file {input_file_id!r} has purpose {meta['purpose']!r}, not 'batch'")
        if endpoint not in OPENAI_URLS:
            raise BatchError(400, f"endpoint {endpoint!r} is not supported; use one of {', '.join(OPENAI_URLS)}")
        if completion_window != "24h":
            raise BatchError(400, "completion_window: only '24h' is supported")
        now = int(time.time())
        batch_id = BATCH_PREFIX + secrets.token_hex(12)
        batch = {
            "id": batch_id, "object": "batch", "endpoint": endpoint, "errors": None,
            "input_file_id": input_file_id, "completion_window": completion_window, "status": "validating",
            "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
            "expires_at": now + 24 * 3600, "finalizing_at": None, "completed_at": None, "failed_at": None,
            "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": metadata,
            # tierq's own fields (not shown to clients)
            "_owner": owner, "_published": 0, "_publishing_done": False, "_invalid": {}, "_custom_ids": {},
        }
        self.batches[batch_id] = batch
        self.results[batch_id] = {}
        self._save(batch)
        self.resume(batch_id)
        return public(batch)

    def resume(self, batch_id: str) -> None:
        """Publish the batch's lines from where it stopped (also after a restart)."""
        task = asyncio.get_running_loop().create_task(self._publish(batch_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def resume_open(self) -> None:
        for batch_id, batch in self.batches.items():
            if batch["status"] in ("validating", "in_progress"):
                self.resume(batch_id)

    def get(self, owner: str, batch_id: str) -> dict[str, Any]:
        batch = self.batches.get(batch_id)
        if batch is None or batch["_owner"] != owner:
            raise BatchError(404, f"no batch {batch_id!r}")
        return public(batch)

    def list(self, owner: str) -> list[dict[str, Any]]:
        mine = [public(b) for b in self.batches.values() if b["_owner"] == owner]
        return sorted(mine, key=lambda b: b["created_at"], reverse=True)

    def cancel(self, owner: str, batch_id: str) -> dict[str, Any]:
        self.get(owner, batch_id)
        batch = self.batches[batch_id]
        if batch["status"] in ("validating", "in_progress"):
            batch["status"] = "cancelling"
            batch["cancelling_at"] = int(time.time())
            self._save(batch)
            self._cancel_unfinished(batch)
            self._maybe_finish(batch)
        return public(batch)

    def _cancel_unfinished(self, batch: dict[str, Any]) -> None:
        """A cancel record for every published line without a result: workers answer them
        ``cancelled`` (queued ones never start, running ones stop), which finishes the batch."""
        results = self.results[batch["id"]]
        for line in list(batch["_custom_ids"]):
            if int(line) not in results:
                task = asyncio.get_running_loop().create_task(self._cancel_line(batch, int(line)))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _cancel_line(self, batch: dict[str, Any], line: int) -> None:
        request_id = request_id_for(batch["id"], line)
        while True:
            try:
                await self.bridge.cancel(request_id, batch["_owner"], f"batch {batch['id']} cancelled")
                return
            except DeliveryError as exc:  # broker unreachable: the line would run to the end; try again
                log.warning("batch_cancel_retry", batch=batch["id"], line=line, error=str(exc))
                await asyncio.sleep(1.0)

    async def _publish(self, batch_id: str) -> None:
        batch = self.batches[batch_id]
        lines = self.file_content(batch["_owner"], batch["input_file_id"]).splitlines()
        numbered = [(n, raw) for n, raw in enumerate(lines, start=1) if raw.strip()]
        batch["request_counts"]["total"] = len(numbered)
        batch["status"] = "in_progress"
        batch["in_progress_at"] = batch["in_progress_at"] or int(time.time())
        deliveries: list[asyncio.Task[None]] = []
        for count, (line, raw) in enumerate(numbered, start=1):
            if batch["status"] != "in_progress":
                break  # cancelled
            if count <= batch["_published"]:
                continue
            self._publish_line(batch, line, raw, deliveries)
            if count % SAVE_EVERY == 0:
                await asyncio.gather(*deliveries)
                deliveries.clear()
                batch["_published"] = count
                self._save(batch)
            else:
                await asyncio.sleep(0)
        await asyncio.gather(*deliveries)
        if batch["status"] == "in_progress":
            batch["_published"] = len(numbered)
        batch["_publishing_done"] = True
        self._save(batch)
        self._maybe_finish(batch)

    def _publish_line(self, batch: dict[str, Any], line: int, raw: bytes, deliveries: list[Any]) -> None:
        custom_id = None
        try:
            document = orjson.loads(raw)
            if not isinstance(document, dict):
                raise MessageError("line: expected a JSON object")
            custom_id = document.get("custom_id")
            if document.get("url") != batch["endpoint"]:
                raise MessageError(f"url: {document.get('url')!r} differs from the batch endpoint {batch['endpoint']!r}")
            doc = from_openai_batch_line(document)
        except (orjson.JSONDecodeError, MessageError, KeyError) as exc:
            message = exc.message if isinstance(exc, MessageError) else f"line is not a valid batch request: {exc}"
            batch["_invalid"][str(line)] = {"custom_id": custom_id, "code": "invalid_request", "message": message}
            return
        doc.update(tenant_id=batch["_owner"], priority=self.priority.value,
                   request_id=request_id_for(batch["id"], line))
        doc["deadline"] = _iso(batch["expires_at"])
        batch["_custom_ids"][str(line)] = custom_id
        deliveries.append(asyncio.get_running_loop().create_task(self._prepare_and_publish(batch, line, doc)))

    async def _prepare_and_publish(self, batch: dict[str, Any], line: int, doc: dict[str, Any]) -> None:
        while True:
            try:
                request = self.bridge.prepare(doc)
                break
            except QuotaExceeded as exc:  # batches wait for quota instead of failing
                await asyncio.sleep(exc.retry_after)
            except MessageError as exc:
                batch["_custom_ids"].pop(str(line), None)
                batch["_invalid"][str(line)] = {"custom_id": doc["metadata"].get("custom_id"),
                                                "code": exc.code.value, "message": exc.message}
                return
        while True:
            try:
                await self.bridge.publish(request)
                return
            except MessageError as exc:
                batch["_custom_ids"].pop(str(line), None)
                batch["_invalid"][str(line)] = {"custom_id": doc["metadata"].get("custom_id"),
                                                "code": exc.code.value, "message": exc.message}
                return
            except DeliveryError as exc:  # broker unreachable: keep the line, try again
                log.warning("batch_publish_retry", batch=batch["id"], line=line, error=str(exc))
                await asyncio.sleep(1.0)

    def _on_reply(self, reply: Reply) -> None:
        batch_id = batch_id_of(reply.request_id)
        if batch_id is None or batch_id not in self.batches:
            return
        batch = self.batches[batch_id]
        line = int(reply.request_id.rsplit(".", 1)[1])
        self.results[batch_id][line] = reply
        self._maybe_finish(batch)

    def _maybe_finish(self, batch: dict[str, Any]) -> None:
        """Count results; once publishing is over and every published line is answered, finish."""
        if batch["status"] not in ("in_progress", "cancelling"):
            return
        results = self.results[batch["id"]]
        ok = sum(1 for r in results.values() if reply_error(r) is None)
        batch["request_counts"].update(completed=ok, failed=len(results) - ok + len(batch["_invalid"]))
        if not batch["_publishing_done"]:
            return
        if any(int(line) not in results for line in batch["_custom_ids"]):
            return
        self._write_outputs(batch)

    def _write_outputs(self, batch: dict[str, Any]) -> None:
        chat = batch["endpoint"] == "/v1/chat/completions"
        out, errors = [], []
        for line, reply in sorted(self.results[batch["id"]].items()):
            custom_id = batch["_custom_ids"].get(str(line), reply.metadata.get("custom_id"))
            problem = reply_error(reply)
            if problem is None:
                body = completion_body(reply, chat, str(reply.metadata.get("model") or self.model_name))
                out.append({"id": f"batch_req_{reply.request_id}", "custom_id": custom_id,
                            "response": {"status_code": 200, "request_id": reply.request_id, "body": body},
                            "error": None})
            else:
                errors.append({"id": f"batch_req_{reply.request_id}", "custom_id": custom_id,
                               "response": {"status_code": problem.status, "request_id": reply.request_id,
                                            "body": problem.body()},
                               "error": None})
        for line, invalid in sorted(batch["_invalid"].items(), key=lambda kv: int(kv[0])):
            errors.append({"id": f"batch_req_line{line}", "custom_id": invalid["custom_id"], "response": None,
                           "error": {"code": invalid["code"], "message": f"line {line}: {invalid['message']}"}})
        owner = batch["_owner"]
        if out:
            batch["output_file_id"] = self.save_file(owner, "batch_output.jsonl", "batch_output", _jsonl(out))["id"]
        if errors:
            batch["error_file_id"] = self.save_file(owner, "batch_errors.jsonl", "batch_output", _jsonl(errors))["id"]
        now = int(time.time())
        if batch["status"] == "cancelling":
            batch["status"], batch["cancelled_at"] = "cancelled", now
        else:
            batch["status"], batch["finalizing_at"], batch["completed_at"] = "completed", now, now
        self._save(batch)
        log.info("batch_finished", batch=batch["id"], status=batch["status"], counts=batch["request_counts"])

    def _save(self, batch: dict[str, Any]) -> None:
        _write_json(self.batches_dir / f"{batch['id']}.json", batch)


def public(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if not k.startswith("_")}


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(row) + b"\n" for row in rows)


def _iso(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
