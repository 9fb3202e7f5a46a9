"""`sni-lab workshop ...` and `sni-lab waf ...`: the attendee's and the instructor's commands.

Everything goes through the running lab's control plane (`--state`, default $SNI_LAB_STATE or
.lab): progress and prediction files live in that lab's state directory, so the commands
work from any directory and write nothing anywhere else.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import textwrap
from urllib.parse import quote

from lab.remote import Api, RemoteError, endpoints

WIDTH = 100


def _opts(p: argparse.ArgumentParser, json_flag: bool = True) -> argparse.ArgumentParser:
    p.add_argument("--state", metavar="DIR", default=os.environ.get("SNI_LAB_STATE", ".lab"),
                   help="the running lab's state directory (default: $SNI_LAB_STATE, else .lab/)")
    if json_flag:
        p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def parsers(sub) -> None:
    ws = sub.add_parser("workshop", help="exercises checked on the running lab; hints; room mode",
                        description="Workshop exercises, checked on the running lab (start one with `sni-lab up`).")
    a = ws.add_subparsers(dest="action", metavar="ACTION")
    _opts(a.add_parser("list", help="the exercises and your progress"))
    for name, text in (("start", "set up exercise N's starting state and show what to do"),
                       ("show", "show exercise N again (goal, story, steps)"),
                       ("hint", "the next hint for N (three: from a nudge to almost the answer)"),
                       ("check", "check N on the running lab (exit 0 when it passes)"),
                       ("reset", "start N again from its starting state (its prediction file too)")):
        _opts(a.add_parser(name, help=text)).add_argument("n", metavar="N")
    sol = _opts(a.add_parser("solution", help="show and apply N's reference solution (asks first)"))
    sol.add_argument("n", metavar="N")
    sol.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    room = _opts(a.add_parser("room", help="instructor: open a room on this lab and print its class token"))
    room.add_argument("--close", action="store_true", help="close the room and forget its scoreboard")
    join = _opts(a.add_parser("join", help="send this lab's check results to the instructor's room"))
    join.add_argument("url", metavar="URL", help="the instructor's lab, e.g. http://192.0.2.10:8000")
    join.add_argument("--name", required=True, help="your name on the scoreboard")
    join.add_argument("--token", required=True, help="the class token the instructor's lab printed")
    _opts(a.add_parser("leave", help="stop sending results to the room"))

    waf = sub.add_parser("waf", help="the zones' WAF rules (CEL), set at run time")
    w = waf.add_subparsers(dest="action", metavar="ACTION")
    _opts(w.add_parser("list", help="every zone's rules"))
    wset = _opts(w.add_parser("set", help="replace ZONE's rules with EXPRESSION... (each blocks when true)"))
    wset.add_argument("zone")
    wset.add_argument("expressions", nargs="+", metavar="EXPRESSION")
    _opts(w.add_parser("clear", help="remove ZONE's rules")).add_argument("zone")


def _print(args, data, human) -> int:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, allow_nan=False))
    else:
        human(data)
    return 0


def _wrap(text: str, indent: str = "  ") -> str:
    return "\n".join(textwrap.fill(p, WIDTH, initial_indent=indent, subsequent_indent=indent)
                     for p in text.split("\n\n"))


def invocation() -> str | None:
    """How to run sni-lab here, when it is not on PATH (docs and steps say `sni-lab`)."""
    if shutil.which("sni-lab"):
        return None
    here = sys.argv[0]
    return here if here.endswith("sni-lab") else f"{sys.executable} -m lab"


def _show(d: dict) -> None:
    print(f"Exercise {d['number']}: {d['title']}")
    print(_wrap(d["story"].replace("\n", " ")))
    print(f"\nGoal: {d['goal']}\n\nSteps:")
    for i, s in enumerate(d["steps"], 1):
        print(textwrap.fill(s, WIDTH, initial_indent=f"  {i}. ", subsequent_indent="     "))
    if d.get("file"):
        print(f"\nYour prediction file: {d['file']}")
    how = invocation()
    if how:
        print(f"\n(`sni-lab` is not on your PATH: run it as {how})")
    if d.get("hints_shown"):
        print("\nHints so far:")
        for i, h in enumerate(d["hints_shown"], 1):
            print(textwrap.fill(h, WIDTH, initial_indent=f"  {i}. ", subsequent_indent="     "))


def _ref(n: str) -> str:
    return quote(str(n), safe="")


def command(args) -> int:
    if args.action is None:
        raise RemoteError("workshop: choose an action: list, start, show, hint, check, reset, solution, room, join, "
                          "leave (see sni-lab workshop --help)", 2)
    api = Api(args.state)
    if args.action == "list":
        def human(rows):
            for r in rows:
                mark = "done" if r["passed"] else ("started" if r["started"] else "")
                need = f"  (needs {', '.join(r['requires'])})" if r["requires"] else ""
                print(f"{r['number']:>2}. {r['title']:<58} {mark:<8}{need}")
            todo = next((r for r in rows if not r["passed"]), None)
            print(f"\n{sum(r['passed'] for r in rows)} of {len(rows)} done."
                  + (f" Next: sni-lab workshop start {todo['number']}" if todo else ""))
        return _print(args, api.call("GET", "/workshop/exercises"), human)
    if args.action in ("start", "reset"):
        api.call("POST", f"/workshop/exercises/{_ref(args.n)}/{args.action}")
        detail = api.call("GET", f"/workshop/exercises/{_ref(args.n)}")
        return _print(args, detail, lambda d: (_show(d), print(f"\nWhen done: sni-lab workshop check {d['number']}")))
    if args.action == "show":
        return _print(args, api.call("GET", f"/workshop/exercises/{_ref(args.n)}"), _show)
    if args.action == "hint":
        def human(d):
            for i, h in enumerate(d["hints"], 1):
                print(textwrap.fill(h, WIDTH, initial_indent=f"Hint {i} of {d['of']}: ", subsequent_indent="  "))
            if d["shown"] == d["of"]:
                print("That was the last hint; `sni-lab workshop solution N` shows the answer.")
        return _print(args, api.call("POST", f"/workshop/exercises/{_ref(args.n)}/hint"), human)
    if args.action == "check":
        result = api.call("POST", f"/workshop/exercises/{_ref(args.n)}/check")

        def human(d):
            for c in d["checks"]:
                print(f"  [{'ok' if c['passed'] else '  '}] {c['says']}")
                if not c["passed"]:
                    print(textwrap.fill(c["detail"], WIDTH, initial_indent="       ", subsequent_indent="       "))
            print(f"\n{d['title']}: {'PASSED' if d['passed'] else 'not yet'}")
            if d["passed"]:
                print(_wrap(d["teaches"].replace("\n", " ")))
            else:
                print("  `sni-lab workshop hint " + d["exercise"][:2].lstrip("0") + "` when stuck.")
            if d.get("room") and d["room"] != "sent":
                print(f"  room: {d['room']}", file=sys.stderr)
        _print(args, result, human)
        return 0 if result["passed"] else 1
    if args.action == "solution":
        return _solution(args, api)
    if args.action == "room":
        if args.close:
            return _print(args, api.call("DELETE", "/workshop/room"), lambda d: print("room closed"))

        def human(d):
            print(f"Room open. Class token: {d['token']}")
            print(f"Attendees join with:\n  sni-lab workshop join URL --name THEIR-NAME --token {d['token']}")
            print(f"URL is this lab's control plane as their laptops reach it ({d['url']} on this machine; from "
                  f"other laptops, this machine's address: docs/instructor.md, \"Running the room\").")
            print(f"Scoreboard: {d['url']}/workshop")
        return _print(args, api.call("POST", "/workshop/room"), human)
    if args.action == "join":
        data = api.call("PUT", "/workshop/joined", {"url": args.url, "name": args.name, "token": args.token})
        return _print(args, data, lambda d: print(f"joined the room at {d['url']} as {d['name']}: each check's "
                                                  f"result (exercise, passed, time) goes there"))
    return _print(args, api.call("DELETE", "/workshop/joined"), lambda d: print("left the room"))


def _solution(args, api: Api) -> int:
    from lab.run import run_loop
    from lab.workshop import solve

    if not args.yes:
        if not sys.stdin.isatty():
            raise RemoteError("solution: this shows the answer and changes the lab; pass --yes to confirm", 2)
        if input(f"Show and apply the solution of exercise {args.n}? Try the hints first. [y/N] ").lower() not in ("y", "yes"):
            print("nothing changed")
            return 1
    data = api.call("POST", f"/workshop/exercises/{_ref(args.n)}/solution")
    ep = endpoints(args.state)
    manual = run_loop(solve.apply(ep, args.state, data["steps"], data.get("file")))
    for step in manual:
        print(f"by hand: {step}")
    print(f"\nNow: sni-lab workshop check {args.n}")
    return 0


def waf_command(args) -> int:
    if args.action is None:
        raise RemoteError("waf: choose an action: list, set, clear", 2)
    api = Api(args.state)

    def human(zones):
        for z in zones if isinstance(zones, list) else [zones]:
            print(f"{z['zone']}{' (SaaS)' if z.get('saas') else ''}")
            for r in z["rules"] or [{"id": "-", "action": "", "expression": "no rules"}]:
                print(f"  {r['id']:<10} {r['action']:<6} {r['expression']}")
    if args.action == "list":
        return _print(args, api.call("GET", "/rules"), human)
    rules = [] if args.action == "clear" else [{"expression": e} for e in args.expressions]
    return _print(args, api.call("PUT", f"/zones/{_ref(args.zone)}/rules", {"rules": rules}), human)
