"""The JSON schemas in docs/schemas, loaded once, for tests to validate real output."""

from __future__ import annotations

import functools
import json
import os

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "schemas")
NAMES = ("common", "snapshot", "events", "ports", "explain", "status", "drops", "explain-bind")


@functools.cache
def _registry() -> Registry:
    resources = []
    for n in NAMES:
        with open(os.path.join(DIR, f"{n}.schema.json")) as f:
            doc = json.load(f)
        resources.append((doc["$id"], Resource.from_contents(doc)))
    return Registry().with_resources(resources)


@functools.cache
def validator(name: str) -> Draft202012Validator:
    with open(os.path.join(DIR, f"{name}.schema.json")) as f:
        schema = json.load(f)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, registry=_registry(), format_checker=Draft202012Validator.FORMAT_CHECKER)


def check(name: str, doc: object) -> None:
    """AssertionError naming every way `doc` breaks the schema `name`."""
    errors = sorted(validator(name).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, f"{name}: " + "; ".join(f"{list(e.path)}: {e.message[:200]}" for e in errors[:5])
