"""The JSON Schema files: current, and accepting the README's example messages."""

import re
from pathlib import Path

import jsonschema
import orjson
import pytest

from tierq.cli import main
from schemas.export import PACKAGED_DIR, SCHEMA_FILES, json_schemas

ROOT = Path(__file__).resolve().parent.parent


def test_packaged_schemas_are_current(tmp_path):
    assert main(["schema", "export", str(tmp_path)]) == 0
    for filename in SCHEMA_FILES:
        assert (tmp_path / filename).read_bytes() == (PACKAGED_DIR / filename).read_bytes(), (
            f"{filename} is stale: run `tierq schema export schemas/json`"
        )


def readme_examples() -> dict[str, dict]:
    """The ```json blocks of the README's message-contract section, by their schema field."""
    text = (ROOT / "README.md").read_text()
    blocks = [orjson.loads(b) for b in re.findall(r"```json\n(.*?)```", text, flags=re.S)]
    return {b["schema"]: b for b in blocks if isinstance(b, dict) and "schema" in b}


@pytest.mark.parametrize(("filename", "schema_id"), [(f, sid) for f, (_, sid) in SCHEMA_FILES.items()])
def test_readme_examples_validate(filename, schema_id):
    example = readme_examples()[schema_id]
    jsonschema.validate(example, json_schemas()[filename])


def test_schema_rejects_what_the_model_rejects():
    request_schema = json_schemas()["tierq.request.v1.schema.json"]
    bad = {**readme_examples()["tierq.request/v1"], "params": {"max_tokens": 0}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, request_schema)
