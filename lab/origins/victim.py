"""www.victim.example's own site: Victim Bank, with a login that sets a session cookie."""
from __future__ import annotations

import secrets

from aiohttp import web

from lab.origins import bank
from lab.origins.common import ORIGIN_KEY, html_response

MAX_SESSIONS = 10000


def routes(app: web.Application) -> None:
    name = app[ORIGIN_KEY].name
    sessions: dict[str, str] = {}  # session token -> user; insertion order = age
    home_page = bank.home(name)
    login_page = bank.login(name)

    def user_of(request: web.Request) -> str | None:
        return sessions.get(request.cookies.get("session", ""))

    async def home(request: web.Request) -> web.Response:
        return html_response(home_page)

    async def login_form(request: web.Request) -> web.Response:
        return html_response(login_page)

    async def login(request: web.Request) -> web.Response:
        form = await request.post()
        user, password = str(form.get("user", "")).strip(), str(form.get("password", ""))
        if not user or not password:
            return html_response(bank.login(name, "Enter your user name and a password."), 400)
        token = secrets.token_urlsafe(24)
        sessions[token] = user
        if len(sessions) > MAX_SESSIONS:  # bounded: benchmarks log in many times
            del sessions[next(iter(sessions))]
        resp = web.Response(status=303, headers={"Location": "/account"})
        # httponly=False ON PURPOSE: this is the lab's deliberate weakness. The payload
        # served in www.victim.example's name reads document.cookie and sends the session
        # to the collector, mirroring the cookie theft of the write-up.
        resp.set_cookie("session", token, path="/", httponly=False, samesite="Lax")
        return resp

    async def logout(request: web.Request) -> web.Response:
        sessions.pop(request.cookies.get("session", ""), None)
        resp = web.Response(status=303, headers={"Location": "/"})
        resp.del_cookie("session", path="/")
        return resp

    async def account(request: web.Request) -> web.Response:
        user = user_of(request)
        if user is None:
            return html_response(bank.not_logged_in(name), 401)
        return html_response(bank.account(bank.account_of(user), name))

    app.router.add_get("/", home)
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/account", account)
