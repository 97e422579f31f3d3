"""Reply building: the one place that turns an outcome into a ``tierq.reply/v1`` message.

Served, failed, expired and refused requests all get their reply here, so every reply
carries the same fields (worker, band, timing, metadata) whichever path produced it.
"""

from __future__ import annotations

import functools
from datetime import datetime, timedelta
from typing import Any, TypeVar

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from schemas.messages import (REPLY_SCHEMA, Band, ErrorCode, ErrorInfo, Reply, Request, Status, Timing, Usage, elapsed,
                              utc_now)
from worker.engine import Completion, Progress


M = TypeVar("M", bound=BaseModel)

#: bound once: ``cls.__new__`` looked up on a pydantic model class costs ~0.3 us a call (no tierq
#: model defines its own ``__new__``)
_new_object = object.__new__
#: the setters of a model's four slots (``BaseModel.__slots__``), what ``object.__setattr__(model,
#: name, value)`` finds and calls for each, without that lookup and argument tuple (~0.5k
#: instructions a slot; four slots a model, three models a served reply)
_set_dict = BaseModel.__dict__["__dict__"].__set__
_set_fields_set = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__


def _instance(cls: type[M], fields: dict[str, Any], fields_set: set[str]) -> M:
    """The instance ``model_construct`` makes: ``fields`` as its ``__dict__`` (every field, in
    order), ``fields_set`` as the fields given, no extra, no private attributes."""
    model = _new_object(cls)
    _set_dict(model, fields)
    _set_fields_set(model, fields_set)
    _set_extra(model, None)
    _set_private(model, None)
    return model


@functools.cache
def _plan(cls: type[BaseModel]) -> tuple[dict[str, Any], tuple[tuple[str, Any], ...], tuple[str, ...]]:
    """``cls``'s fields in order with their static defaults (PydanticUndefined where there is none),
    the fields with a default factory, and the required ones."""
    fields = cls.__pydantic_fields__
    if (cls.__pydantic_post_init__ or cls.__private_attributes__ or cls.model_config.get("extra") == "allow"
            or any(field.default_factory_takes_validated_data for field in fields.values())):
        raise TypeError(f"{cls.__name__}: construct() covers plain models only")
    template = {name: PydanticUndefined if field.default_factory else field.default for name, field in fields.items()}
    factories = tuple((name, field.default_factory) for name, field in fields.items() if field.default_factory)
    required = tuple(name for name, field in fields.items() if field.is_required())
    return template, factories, required


def construct(cls: type[M], **values: Any) -> M:
    """``cls.model_construct(**values)`` (trusted values, by field name, no validation) without its
    walk over every field's aliases and defaults on each call (most of a reply's build time). The
    same instance: fields in order, defaults and factories as there, fields set = those given
    (tests/test_reply_builder.py compares the two)."""
    template, factories, required = _plan(cls)
    fields = template.copy()
    fields.update(values)
    for name, factory in factories:
        if name not in values:
            fields[name] = factory()
    for name in required:  # as model_construct: a required field not given is left out
        if name not in values:
            del fields[name]
    return _instance(cls, fields, set(values))


#: a timing's milliseconds are ``delta / _MS``: the whole microseconds over 1000, rounded once to the
#: nearest float, which is what ``round(delta.total_seconds() * 1000, 3)`` gives for any duration under
#: ~30 years (the float error of ``total_seconds() * 1000`` stays far below the 0.0005 that rounding to
#: three places absorbs), for half its instructions (``round`` to digits formats the float)
_MS = timedelta(milliseconds=1)
#: the fields ``served`` sets (every field but the schema, which is the default, and error)
_TIMING_FIELDS = set(Timing.__pydantic_fields__)
_USAGE_FIELDS = set(Usage.__pydantic_fields__)
_SERVED_FIELDS = set(Reply.__pydantic_fields__) - {"schema_", "error"}
_OK = Status.ok  # an enum's member looked up on its class is a Python-level lookup on 3.11


def _ms(start: datetime | None, end: datetime | None) -> float | None:
    return None if start is None or end is None else (end - start) / _MS


class ReplyBuilder:
    def __init__(self, worker_id: str):
        self.worker_id = worker_id

    def served(self, request: Request, band: Band, served_as: Band, completion: Completion, *, attempt: int,
               received_at: datetime, dequeued_at: datetime) -> Reply:
        """The reply of a served request: the same instances as ``construct(Reply, ...)`` with a
        ``construct(Timing, ...)`` and a ``construct(Usage, ...)`` in it (tests/test_reply_builder.py),
        made without its generic steps: one per request, a fifth of the worker's instructions."""
        submitted_at, first_token_at, finished_at = request.submitted_at, completion.first_token_at, \
            completion.finished_at
        # the request's time carries pydantic's tzinfo and ours datetime's: subtracting across the two
        # calls pydantic's utcoffset() (``elapsed`` does not), so once; e2e adds the queue time to ours
        # (timedeltas add exactly)
        queue = elapsed(submitted_at, dequeued_at)
        timing = _instance(Timing, {
            "submitted_at": submitted_at, "received_at": received_at, "dequeued_at": dequeued_at,
            "first_token_at": first_token_at, "finished_at": finished_at, "queue_ms": queue / _MS,
            "ttft_ms": None if first_token_at is None else (first_token_at - dequeued_at) / _MS,
            "e2e_ms": (queue + (finished_at - dequeued_at)) / _MS,
        }, _TIMING_FIELDS.copy())
        usage = _instance(Usage, {"prompt_tokens": completion.prompt_tokens,
                                  "completion_tokens": completion.completion_tokens}, _USAGE_FIELDS.copy())
        return _instance(Reply, {
            "schema_": REPLY_SCHEMA, "request_id": request.request_id, "tenant_id": request.tenant_id,
            "status": _OK, "text": completion.text, "finish_reason": completion.finish_reason,
            "usage": usage, "error": None, "priority": band, "served_as": served_as, "worker": self.worker_id,
            "attempt": attempt, "timing": timing, "metadata": request.metadata, "simulated": completion.simulated,
            "choices": list(choices) if (choices := completion.choices) else None,
        }, _SERVED_FIELDS.copy())

    def failed(self, request: Request, band: Band, served_as: Band, code: ErrorCode, message: str, *,
               received_at: datetime, dequeued_at: datetime) -> Reply:
        """The engine refused or failed this request after admission."""
        timing = Timing(submitted_at=request.submitted_at, received_at=received_at, dequeued_at=dequeued_at,
                        finished_at=utc_now())
        return self._reply(request.request_id, request.tenant_id, request.metadata, band, Status.error,
                           error=ErrorInfo(code=code, message=message), served_as=served_as, timing=timing)

    def cancelled(self, request: Request, band: Band, served_as: Band | None, *, prompt_tokens: int = 0,
                  progress: Progress | None = None, attempt: int = 1, received_at: datetime | None = None,
                  dequeued_at: datetime | None = None) -> Reply:
        """Cancelled by its tenant: before it started (no ``progress``), or while running, with the
        text and usage made until the engine aborted it."""
        made = progress.completion_tokens if progress is not None else 0
        message = (f"cancelled by the tenant after {made} of {request.params.max_tokens} tokens"
                   if progress is not None else "cancelled by the tenant before it started")
        first_token_at = progress.first_token_at if progress is not None else None
        finished_at = utc_now()
        timing = Timing(submitted_at=request.submitted_at, received_at=received_at, dequeued_at=dequeued_at,
                        first_token_at=first_token_at, finished_at=finished_at,
                        queue_ms=_ms(request.submitted_at, dequeued_at), ttft_ms=_ms(dequeued_at, first_token_at),
                        e2e_ms=_ms(request.submitted_at, finished_at))
        return self._reply(request.request_id, request.tenant_id, request.metadata, band, Status.cancelled,
                           error=ErrorInfo(code=ErrorCode.cancelled, message=message), served_as=served_as,
                           text=progress.text if progress is not None else None, attempt=attempt, timing=timing,
                           usage=Usage(prompt_tokens=prompt_tokens if progress is not None else 0,
                                       completion_tokens=made))

    def expired(self, request: Request, band: Band) -> Reply:
        assert request.deadline is not None
        message = f"deadline {request.deadline.isoformat()} passed before admission"
        return self._reply(request.request_id, request.tenant_id, request.metadata, band, Status.expired,
                           error=ErrorInfo(code=ErrorCode.deadline_exceeded, message=message),
                           timing=Timing(submitted_at=request.submitted_at, finished_at=utc_now()))

    def refused(self, request_id: str, tenant_id: str, metadata: dict[str, Any], band: Band, code: ErrorCode,
                message: str, submitted_at: datetime | None = None) -> Reply:
        """Refused before admission (invalid, wrong pool or band, too long, abandoned)."""
        return self._reply(request_id, tenant_id, metadata, band, Status.error,
                           error=ErrorInfo(code=code, message=message),
                           timing=Timing(submitted_at=submitted_at, finished_at=utc_now()))

    def _reply(self, request_id: str, tenant_id: str, metadata: dict[str, Any], band: Band, status: Status,
               **fields: Any) -> Reply:
        # built from validated requests and our own values: skip pydantic's validation (a quarter of
        # the worker's CPU per request); tests validate every kind of reply against the JSON Schema
        return construct(Reply, request_id=request_id, tenant_id=tenant_id, status=status, priority=band,
                                     worker=self.worker_id, metadata=metadata, **fields)
