"""Check a served response against the OpenAPI schema the app publishes for its route and status.

A small validator of the JSON Schema that FastAPI writes (type, properties, required, additionalProperties,
items, anyOf, const, enum, $ref into components), so the check needs no `jsonschema` package: what a client
generated from /openapi.json expects is what the server sends.
"""

from __future__ import annotations

TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def schema_errors(value, schema: dict, components: dict, where: str = "body") -> list[str]:
    """Where `value` breaks `schema` (empty when it conforms)."""
    if "$ref" in schema:
        return schema_errors(value, components[schema["$ref"].rsplit("/", 1)[-1]], components, where)
    if "anyOf" in schema:
        tried = [schema_errors(value, s, components, where) for s in schema["anyOf"]]
        return [] if any(not t for t in tried) else [f"{where}: matches none of anyOf: {tried}"]
    if "const" in schema and value != schema["const"]:
        return [f"{where}: {value!r} is not {schema['const']!r}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: {value!r} not in {schema['enum']}"]
    kind = schema.get("type")
    if kind == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = kind is None or isinstance(value, TYPES[kind])
    if not ok:
        return [f"{where}: {value!r} is not of type {kind}"]
    errors = []
    if kind == "object":
        properties = schema.get("properties", {})
        errors += [f"{where}: missing {key!r}" for key in schema.get("required", []) if key not in value]
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in properties:
                errors += schema_errors(item, properties[key], components, f"{where}.{key}")
            elif extra is False:
                errors.append(f"{where}: unexpected key {key!r}")
            elif isinstance(extra, dict):
                errors += schema_errors(item, extra, components, f"{where}.{key}")
    if kind == "array" and "items" in schema:
        for i, item in enumerate(value):
            errors += schema_errors(item, schema["items"], components, f"{where}[{i}]")
    return errors


def assert_matches_schema(client, method: str, path: str, response) -> None:
    """Assert `response` (an httpx response of `client`'s app to METHOD `path`) is what the app's OpenAPI schema
    promises for that route and status code."""
    spec = client.get("/openapi.json").json()
    operation = spec["paths"][path][method.lower()]
    documented = operation["responses"].get(str(response.status_code))
    assert documented is not None, f"{method} {path} answered {response.status_code}, which its schema does not list"
    schema = documented["content"]["application/json"]["schema"]
    errors = schema_errors(response.json(), schema, spec.get("components", {}).get("schemas", {}))
    assert not errors, f"{method} {path} {response.status_code}: {errors}"
