"""JSON Schema files for the wire messages, for clients written in other languages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from schemas.messages import CANCEL_SCHEMA, CHUNK_SCHEMA, REPLY_SCHEMA, REQUEST_SCHEMA, Cancel, Chunk, Reply, Request

#: File name -> (model, schema id). Names carry the version so v2 can sit beside v1.
SCHEMA_FILES: dict[str, tuple[type, str]] = {
    "tierq.request.v1.schema.json": (Request, REQUEST_SCHEMA),
    "tierq.reply.v1.schema.json": (Reply, REPLY_SCHEMA),
    "tierq.chunk.v1.schema.json": (Chunk, CHUNK_SCHEMA),
    "tierq.cancel.v1.schema.json": (Cancel, CANCEL_SCHEMA),
}

#: The copy shipped in the package and kept in the repository (a test checks it is current).
PACKAGED_DIR = Path(__file__).parent / "json"


def json_schemas() -> dict[str, dict[str, Any]]:
    schemas = {}
    for filename, (model, schema_id) in SCHEMA_FILES.items():
        schema = model.model_json_schema(by_alias=True, mode="validation")
        schemas[filename] = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": schema_id, **schema}
    return schemas


def export_json_schemas(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, schema in json_schemas().items():
        path = directory / filename
        path.write_bytes(orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")
        written.append(path)
    return written
