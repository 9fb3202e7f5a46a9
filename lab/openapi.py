"""The control plane's OpenAPI 3.1 description, served at GET /openapi.json.

Request bodies and query parameters come from `lab.schema`, the tables the control plane
validates with, so the document cannot drift from what is accepted."""
from __future__ import annotations

from lab import __version__, schema
from lab.topology import HOSTNAME_STATUSES, VALIDATION_MODES

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
                 "description": "Custom hostnames, DNS admin (records and poisoning overrides), zones, the edge's "
                                "model, the validation mode, and the lab's events. Requests that change something need a Bearer token."},
        "paths": {
            "/health": {"get": _op("liveness, model and engine")},
            "/openapi.json": {"get": _op("this document")},
            "/hostnames": {"get": {**_op("a page of custom hostnames, in the order they were registered",
                                         schema=ref("HostnamePage"), params=_params(schema.LIST_HOSTNAMES)),
                                   "description": "`next` is the cursor of the page after this one (null: the last); "
                                                  "give it as `cursor`, with the same filters, for that page."},
                           "post": {**_op("register custom hostnames (each starts pending): one, or a list of up to "
                                          f"{schema.HOSTNAMES_BATCH_MAX}", "201", {"oneOf": [
                                              ref("Hostname"), ref("HostnameList")]}, auth=True),
                                    "requestBody": {"required": True, "content": {"application/json": {"schema": {
                                        "oneOf": [ref("NewHostname"), {
                                            "type": "array", "items": ref("NewHostname"), "minItems": 1,
                                            "maxItems": schema.HOSTNAMES_BATCH_MAX}]}}}},
                                    "description": "A list is all or nothing: every item is checked as a single "
                                                   "registration is (an error names its item, `item N: ...`), then "
                                                   "all are saved in one transaction."}},
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
            "/validation": {"get": _op("how custom hostnames are validated", schema=ref("ValidationState")),
                            "put": _op("switch the validation mode (saved, then applied)", schema=ref("ValidationState"),
                                       body="Validation", auth=True)},
            "/zones": {"get": _op("every zone on the edge (the world file's and those added at run time)",
                                  schema=listof("Zone")),
                       "post": {**_op("put a zone on the edge (403 code v1-closed: a v1 address under v1-waf)",
                                      "201", ref("Zone"), "NewZone", True)}},
            "/zones/{name}": {"delete": _op("remove a zone added at run time (409 while it has custom hostnames)",
                                            schema=ref("Zone"), auth=True, params=[_q("name", where="path")])},
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
                "Error": {"type": "object", "properties": {
                    "error": {"type": "string"},
                    "code": {"type": "string", "description": "a refusal's lab code (docs/design.md)"}},
                    "required": ["error"]},
                "NewHostname": schema.json_schema(schema.NEW_HOSTNAME),
                "Hostname": {"type": "object", "properties": {
                    "id": {"type": "string"}, "name": {"type": "string"}, "zone": {"type": "string"},
                    "status": {"enum": list(HOSTNAME_STATUSES)}, "reason": {"type": "string"},
                    "txt_name": {"type": "string"}, "txt_token": {"type": "string"}, "http_path": {"type": "string"},
                    "http_token": {"type": "string"}, "ownership": {"type": ["string", "null"]},
                    "routable": {"type": "boolean"}, "created": {"type": "number"}, "updated": {"type": "number"},
                    "failures": {"type": "integer", "description": "failed lookups in a row (not evidence)"},
                    "last_error": {"type": ["string", "null"]},
                    "next_check": {"type": ["number", "null"],
                                   "description": "when the background verifier asks next (docs/design.md, "
                                                  "\"The verifier's schedule\"); null: never"},
                    "negatives": {"type": "integer", "description": "negative DNS answers in a row while active"},
                    "negative_since": {"type": ["number", "null"]},
                    "checks": {"type": "integer", "description": "real answers since the status began (the "
                                                                  "step of the pending schedule)"},
                    "poisoned_by": {"type": ["string", "null"],
                                    "description": "the lab's knowledge, never the provider's: overrides that answered "
                                                   "the verification that made it active (a forged proof)"}}},
                "HostnamePage": {"type": "object", "required": ["hostnames", "next"], "properties": {
                    "hostnames": listof("Hostname"), "next": {"type": ["string", "null"]}}},
                "HostnameList": {"type": "object", "required": ["hostnames"], "properties": {
                    "hostnames": listof("Hostname")}},
                "Validation": schema.json_schema(schema.VALIDATION),
                "ValidationState": {"type": "object", "properties": {
                    "mode": {"enum": list(VALIDATION_MODES)}, "modes": {"type": "array", "items": {"type": "string"}},
                    "vantages": {"type": "array", "items": {"type": "string"},
                                 "description": "the source addresses the verifier asks from"},
                    "http_through_edge": {"type": "boolean"}}},
                "NewZone": schema.json_schema(schema.NEW_ZONE),
                "Zone": {"type": "object", "properties": {
                    "name": {"type": "string"}, "origin": {"type": "string"}, "saas": {"type": "boolean"},
                    "hosts": {"type": "array", "items": {"type": "string"}},
                    "cname_target": {"type": ["string", "null"]}, "v1_listener": {"type": ["string", "null"]},
                    "v1_allowlisted": {"type": "boolean"}, "added": {"type": "boolean"}}},
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
