"""A zone's WAF custom rules at run time: `GET /rules` (every zone's), `GET|PUT /zones/{name}/rules`.

Why an API rather than a world-file edit and a restart: an attendee writing a rule (workshop
exercise 3) tries several in a minute, and the exercise's starting state must clear them
without restarting anyone's lab. The rules a PUT sets replace the zone's (the world file's
included), are compiled before anything changes (a rule that does not compile is a 400 that
changes nothing), saved in the lab's state, then applied to the running edge, and told as a
`waf.rules` event. They apply in every model, as the world file's do (`policy._route`).
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from aiohttp import web

from lab import waf
from lab.hostnorm import HostError, normalize
from lab.topology import WafRule, World

SETTING = "waf.rules"
MAX_RULES = 16
MAX_EXPRESSION = 1000
_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")


def parse_rules(zone: str, body: Any) -> tuple[WafRule, ...]:
    """`{"rules": [{"expression": ..., "id"?, "action"?, "description"?}]}`, checked and compiled; ValueError."""
    if not isinstance(body, dict) or set(body) != {"rules"} or not isinstance(body["rules"], list):
        raise ValueError('expected {"rules": [{"expression": "..."}, ...]}')
    if len(body["rules"]) > MAX_RULES:
        raise ValueError(f"at most {MAX_RULES} rules per zone")
    out = []
    for i, r in enumerate(body["rules"]):
        if not isinstance(r, dict) or not set(r) <= {"id", "expression", "action", "description"}:
            raise ValueError(f"rules[{i}]: a table of id, expression, action, description")
        expression = r.get("expression")
        if not isinstance(expression, str) or not expression.strip() or len(expression) > MAX_EXPRESSION:
            raise ValueError(f"rules[{i}].expression: a CEL expression of 1 to {MAX_EXPRESSION} characters")
        rid = r.get("id", f"rule-{i + 1}")
        if not isinstance(rid, str) or not _ID.fullmatch(rid):
            raise ValueError(f"rules[{i}].id: lower-case letters, digits, - and _ (up to 40)")
        action = r.get("action", "block")
        if action not in ("block", "allow"):
            raise ValueError(f"rules[{i}].action: block or allow")
        description = r.get("description", "")
        if not isinstance(description, str) or len(description) > 200:
            raise ValueError(f"rules[{i}].description: text of up to 200 characters")
        out.append(WafRule(rid, expression.strip(), action, description))
    if len({r.id for r in out}) != len(out):
        raise ValueError("two rules with one id")
    rules = tuple(out)
    try:
        waf.compile_rules(zone, rules)
    except waf.WafError as e:
        raise ValueError(str(e)) from None
    return rules


def with_rules(world: World, zone: str, rules: tuple[WafRule, ...]) -> World:
    zones = tuple(dataclasses.replace(z, rules=rules) if z.name == zone else z for z in world.zones)
    return dataclasses.replace(world, zones=zones)


def to_json(rules: tuple[WafRule, ...]) -> list[dict]:
    return [dataclasses.asdict(r) for r in rules]


def setup(app: web.Application, control) -> None:
    lab, state = control.lab, control.state

    def saved() -> dict[str, list]:
        try:
            data = json.loads(state.get(SETTING) or "{}")
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    for zone, rules in saved().items():  # what was set before a restart
        if zone in lab.world.zone_by_name:
            try:
                lab.set_world(with_rules(lab.world, zone, parse_rules(zone, {"rules": rules})))
            except ValueError:
                pass  # a rule this version cannot compile: the world file's stay

    def zone_of(request: web.Request) -> str:
        try:
            name = normalize(request.match_info["name"])
        except HostError:
            name = None
        if name not in lab.world.zone_by_name:
            raise web.HTTPNotFound(text=json.dumps({"error": f"no zone {request.match_info['name'][:100]!r}"}),
                                   content_type="application/json")
        return name

    async def get(request: web.Request) -> web.Response:
        zone = zone_of(request)
        return web.json_response({"zone": zone, "rules": to_json(lab.world.zone_by_name[zone].rules)})

    async def put(request: web.Request) -> web.Response:
        zone = zone_of(request)
        try:
            body = json.loads(await request.text())
        except (ValueError, UnicodeDecodeError, RecursionError):
            return web.json_response({"error": "body is not valid JSON"}, status=400)
        rules = parse_rules(zone, body)  # ValueError: the control plane's middleware answers 400
        every = saved()
        every[zone] = to_json(rules)
        state.set(SETTING, json.dumps(every))
        lab.set_world(with_rules(lab.world, zone, rules))
        lab.events.emit("waf.rules", zone=zone, rules=[r.id for r in rules],
                        expressions=[r.expression for r in rules])
        return web.json_response({"zone": zone, "rules": to_json(rules)})

    async def every_zone(request: web.Request) -> web.Response:
        return web.json_response([{"zone": z.name, "saas": z.saas, "rules": to_json(z.rules)} for z in lab.world.zones])

    app.router.add_get("/rules", every_zone)
    app.router.add_get("/zones/{name}/rules", get)
    app.router.add_put("/zones/{name}/rules", put)
