"""The control plane's OpenAPI 3.1 description, served at GET /openapi.json.

Request bodies and query parameters come from `lab.schema`, the tables the control plane
validates with, so the document cannot drift from what is accepted."""
from __future__ import annotations

from lab import __version__, schema
from lab.topology import HOSTNAME_STATUSES

_ERROR = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_AUTH = [{"bearer": []}]


def _op(summary: str, ok: str = "200", schema: dict | None = None, body: str | None = None, auth: bool = False,
        params: list[dict] | None = None) -> dict:
    op: dict = {"summary": summary, "responses": {ok: {"description": "ok", "content": {"application/json": {
        "schema": schema or {"type": "object"}}}}, "400": _ERROR}}
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}}}
    if auth:
        op["security"] = _AUTH
        op["responses"]["401"] = _ERROR
        op["responses"]["503"] = _ERROR  # the change could not be saved: nothing changed
    if params:
        op["parameters"] = params
    return op


def _q(name: str, typ: str = "string", required: bool = False, where: str = "query") -> dict:
    return {"name": name, "in": where, "required": required or where == "path", "schema": {"type": typ}}


def _params(fields: tuple[schema.Field, ...]) -> list[dict]:
    props = schema.json_schema(fields)["properties"]
    return [{"name": f.name, "in": "query", "required": f.required, "schema": props[f.name]} for f in fields]


def spec() -> dict:
    ref = lambda n: {"$ref": f"#/components/schemas/{n}"}
    listof = lambda n: {"type": "array", "items": ref(n)}
    hostname_ref = [_q("ref", where="path")]
    return {
        "openapi": "3.1.0",
        "info": {"title": "sni-lab control plane", "version": __version__,
                 "description": "Custom hostnames, DNS admin (records and poisoning overrides), the edge's model, "
                                "and the lab's events. Requests that change something need a Bearer token."},
        "paths": {
            "/health": {"get": _op("liveness, model and engine")},
            "/openapi.json": {"get": _op("this document")},
            "/hostnames": {"get": _op("list custom hostnames", schema=listof("Hostname")),
                           "post": _op("register a custom hostname (always starts pending)", "201", ref("Hostname"),
                                       "NewHostname", True)},
            "/hostnames/{ref}": {"get": _op("one custom hostname, by id or name", schema=ref("Hostname"), params=hostname_ref),
                                 "delete": _op("delete it (terminal; listed as deleted unless purge=1)",
                                               schema=ref("Hostname"), auth=True,
                                               params=hostname_ref + _params(schema.DELETE_HOSTNAME))},
            "/hostnames/{ref}/verify": {"post": _op("verify now: TXT and HTTP ownership, DNS target",
                                                    schema=ref("Hostname"), auth=True, params=hostname_ref)},
            "/dns/records": {"get": _op("records the resolver serves", schema=listof("Record")),
                             "post": _op("set a record", "201", ref("Record"), "Record", True),
                             "delete": _op("delete records of a name", auth=True,
                                           params=_params(schema.DELETE_RECORD))},
            "/dns/overrides": {"get": _op("active overrides (poisoning)", schema=listof("Override")),
                               "post": _op("force an answer, optionally for one client and with an expiry", "201",
                                           ref("Override"), "NewOverride", True)},
            "/dns/overrides/{ref}": {"delete": _op("remove an override by id, or every override of a name", auth=True,
                                                   params=[_q("ref", where="path")])},
            "/model": {"get": _op("the edge's model"),
                       "put": _op("switch the model at run time", body="Model", auth=True)},
            "/events": {"get": {**_op("events as JSON, or as Server-Sent Events with Accept: text/event-stream",
                                      schema=listof("Event"),
                                      params=_params(schema.EVENTS)),
                                "description": "SSE resumes from Last-Event-ID (everything after it: newest "
                                               "is then ignored). The lab's own traffic (internal: true) is "
                                               "left out unless internal=1."}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]},
                "NewHostname": schema.json_schema(schema.NEW_HOSTNAME),
                "Hostname": {"type": "object", "properties": {
                    "id": {"type": "string"}, "name": {"type": "string"}, "zone": {"type": "string"},
                    "status": {"enum": list(HOSTNAME_STATUSES)}, "reason": {"type": "string"},
                    "txt_name": {"type": "string"}, "txt_token": {"type": "string"}, "http_path": {"type": "string"},
                    "http_token": {"type": "string"}, "ownership": {"type": ["string", "null"]},
                    "routable": {"type": "boolean"}, "created": {"type": "number"}, "updated": {"type": "number"},
                    "failures": {"type": "integer", "description": "failed lookups in a row (not evidence)"},
                    "last_error": {"type": ["string", "null"]},
                    "next_check": {"type": ["number", "null"], "description": "the verifier's retry, after failures"},
                    "negatives": {"type": "integer", "description": "negative DNS answers in a row while active"},
                    "negative_since": {"type": ["number", "null"]}}},
                "Record": schema.json_schema(schema.RECORD),
                "NewOverride": schema.json_schema(schema.NEW_OVERRIDE),
                "Override": {"type": "object", "properties": {
                    "id": {"type": "string"}, "name": {"type": "string"}, "type": {"type": "string"},
                    "values": {"type": "array", "items": {"type": "string"}}, "client": {"type": ["string", "null"]},
                    "expires": {"type": ["number", "null"]}, "ttl": {"type": "integer"}}},
                "Model": schema.json_schema(schema.MODEL),
                "Event": {"type": "object", "required": ["id", "ts", "kind"], "properties": {
                    "id": {"type": "integer"}, "ts": {"type": "number"}, "kind": {"type": "string"},
                    "trace": {"type": ["string", "null"]}}, "additionalProperties": True},
            },
        },
    }
