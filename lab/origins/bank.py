"""Victim Bank's pages, as HTML text: the victim's own site and the attacker's copy of it.

One renderer for both, because that is the attack: under a valid certificate for
www.victim.example the attacker's tenant serves a page that looks exactly like the bank's.
The only differences are the footer's "served by" line (the marker a presenter points at)
and the payload script. Pure: data in, text out; no external font, script or image, so the
pages work offline and a projector shows them large (1280x720 in mind).
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from html.parser import HTMLParser

NAME = "Victim Bank"


@dataclass(frozen=True)
class Account:
    holder: str
    number: str
    balance: str
    transactions: tuple[tuple[str, str, str], ...]  # (date, description, amount)


ALICE = Account("alice", "VB 4021 7734 0019", "€ 12,480.55", (
    ("28 Nov", "Salary, ACME Corp", "+ € 3,200.00"),
    ("27 Nov", "Rent, Elm Street 12", "− € 1,150.00"),
    ("25 Nov", "Corner Grocery", "− € 64.20"),
    ("24 Nov", "Transfer to Bob", "− € 250.00"),
))


def account_of(user: str) -> Account:
    """alice is the lab's customer; anyone else who logs in gets an empty account."""
    if user == ALICE.holder:
        return ALICE
    return Account(user, "VB 0000 0000 " + f"{sum(map(ord, user)) % 10000:04d}", "€ 0.00", ())


_CSS = """
*{box-sizing:border-box}
html{font-size:22px}
body{margin:0;background:#f4f6fa;color:#0d1b2a;line-height:1.35;
 font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans","DejaVu Sans",Arial,sans-serif}
header{background:#0b2a55;color:#fff;border-bottom:6px solid #f2b705}
.bar{max-width:1160px;margin:0 auto;padding:.55rem 1.2rem;display:flex;align-items:center;gap:1rem}
.brand{display:flex;align-items:center;gap:.6rem;color:#fff;text-decoration:none;font-weight:800;font-size:1.55rem}
.brand svg{width:2.3rem;height:2.3rem}
nav{margin-left:auto;display:flex;gap:1.2rem;align-items:center}
nav a,nav button{color:#fff;font:inherit;font-weight:600;text-decoration:none;background:none;border:0;cursor:pointer;padding:0}
nav a:hover,nav button:hover{text-decoration:underline}
main{max-width:1160px;margin:0 auto;padding:1.1rem 1.2rem}
h1{font-size:2.1rem;margin:.2rem 0 .6rem}
h2{font-size:1.25rem;margin:0 0 .6rem}
.grid{display:grid;grid-template-columns:1.4fr 1fr;gap:1.2rem;align-items:start}
.card{background:#fff;border:2px solid #d5dbe5;border-radius:12px;padding:1.1rem 1.3rem}
.lead{font-size:1.2rem;margin:0 0 1.2rem}
.button{display:inline-block;background:#0b2a55;color:#fff;border:0;border-radius:8px;font:inherit;
 font-weight:700;padding:.55rem 1.5rem;text-decoration:none;cursor:pointer}
.button:hover{background:#163f7a}
.tip{border-left:8px solid #f2b705}
label{display:block;font-weight:700;margin:.7rem 0 .25rem}
input{font:inherit;width:100%;padding:.45rem .6rem;border:2px solid #8a96a8;border-radius:8px}
input:focus{outline:3px solid #f2b705;border-color:#0b2a55}
form .button{margin-top:1rem}
.hint{color:#3d4a5c;font-size:.85rem;margin:.8rem 0 0}
.error{background:#fde8e8;border:2px solid #b3261e;color:#7a1410;border-radius:8px;padding:.5rem .8rem}
.balance{font-size:2.3rem;font-weight:800;margin:.1rem 0}
.muted{color:#3d4a5c}
table{width:100%;border-collapse:collapse}
td{padding:.3rem .2rem;border-bottom:1px solid #d5dbe5}
td.amount{text-align:right;font-weight:700;white-space:nowrap}
td.in{color:#0a6b2d}
footer{max-width:1160px;margin:0 auto;padding:.4rem 1.2rem 1rem;color:#3d4a5c;font-size:.8rem}
footer .note{background:#fff8e1;border:2px solid #e0b400;color:#3b2f00;border-radius:8px;padding:.5rem .8rem;margin-bottom:.5rem}
"""

# The logo: a shield with a V, drawn inline so nothing is fetched.
_LOGO = ('<svg viewBox="0 0 48 48" aria-hidden="true"><path d="M24 3 42 9v13c0 11-7.5 19.5-18 23C13.5 41.5 6 33 6 22V9z" '
         'fill="#f2b705"/><path d="M15 15h5l4 12 4-12h5l-7 19h-4z" fill="#0b2a55"/></svg>')


def page(title: str, body: str, served_by: str, *, user: str | None = None, note: str = "", script: str = "") -> str:
    """A whole page in the bank's layout. `served_by` names the origin in the footer: the
    presenter's marker, the only visible difference between the bank and its copy."""
    if user is None:
        nav = '<a href="/login">Log in</a>'
    else:
        nav = ('<a href="/account">My account</a><form method="post" action="/logout">'
               '<button type="submit">Log out</button></form>')
    e = html.escape
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<link rel="icon" href="data:,"><title>{e(title)} · {NAME}</title><style>{_CSS}</style></head>'
            f'<body><header><div class="bar"><a class="brand" href="/">{_LOGO}{NAME}</a><nav>{nav}</nav></div></header>'
            f'<main>{body}</main><footer>{note}<div>© {NAME} · www.victim.example · '
            f'<span class="served-by">served by {e(served_by)}</span></div></footer>'
            + (f"<script>{script}</script>" if script else "") + "</body></html>")


def home(served_by: str, script: str = "") -> str:
    return page("Online banking", (
        '<div class="grid"><section><h1>Banking you can trust.</h1>'
        '<p class="lead">Check your balance and your latest payments, any time.</p>'
        '<a class="button" href="/login">Log in to online banking</a></section>'
        '<aside class="card tip"><h2>Security tip</h2><p>Before you log in, check the padlock and '
        '<b>www.victim.example</b> in the address bar. We will never ask for your password by e-mail.</p></aside>'
        '</div>'), served_by, script=script)


def login(served_by: str, error: str = "") -> str:
    err = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    return page("Log in", (
        '<div class="grid"><section class="card"><h1>Log in</h1>' + err +
        '<form method="post" action="/login">'
        '<label for="user">User</label><input id="user" name="user" autocomplete="username" autofocus>'
        '<label for="password">Password</label>'
        '<input id="password" name="password" type="password" autocomplete="current-password">'
        '<button class="button" type="submit">Log in</button></form>'
        '<p class="hint">Lab account: <b>alice</b>, any password.</p></section>'
        '<aside class="card tip"><h2>Is this really us?</h2><p>The padlock says the connection is encrypted '
        'for <b>www.victim.example</b>. It cannot say which server answered.</p></aside></div>'), served_by)


# Why the cookie is readable by script: the lesson is its theft. Shown under the account.
_HTTPONLY_NOTE = (
    '<p class="note"><b>Lab note:</b> this session cookie is readable by script (no <code>HttpOnly</code>) on purpose: '
    'the attacker\'s page steals it with <code>document.cookie</code>. <code>HttpOnly</code> would stop that theft, '
    'but not the attack: a look-alike page served under a valid certificate for www.victim.example '
    'can still ask you for your password.</p>')


def account(acct: Account, served_by: str) -> str:
    """The private data. `data-field` marks what the attacker's replay reads back (`read_account`)."""
    e = html.escape
    rows = "".join(f'<tr><td class="muted">{e(d)}</td><td>{e(what)}</td>'
                   f'<td class="amount{" in" if amount.startswith("+") else ""}">{e(amount)}</td></tr>'
                   for d, what, amount in acct.transactions) or '<tr><td class="muted">No transactions yet.</td></tr>'
    return page("My account", (
        f'<h1>Hello, <span data-field="holder">{e(acct.holder)}</span></h1>'
        '<div class="grid"><section class="card"><h2>Last transactions</h2><table>' + rows + '</table></section>'
        f'<section class="card"><h2>Current account</h2><p class="muted">Account number<br>'
        f'<b data-field="number">{e(acct.number)}</b></p><p class="muted">Balance</p>'
        f'<p class="balance" data-field="balance">{e(acct.balance)}</p></section></div>'),
        served_by, user=acct.holder, note=_HTTPONLY_NOTE)


def not_logged_in(served_by: str) -> str:
    return page("Log in first", '<section class="card"><h1>Please log in</h1><p class="lead">Your session has ended '
                                'or you have not logged in yet.</p><a class="button" href="/login">Log in</a></section>',
                served_by)


_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _Fields(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, str] = {}
        self._open: list[str | None] = []  # the data-field of each open element

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in _VOID:  # no end tag follows them
            self._open.append(dict(attrs).get("data-field"))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        pass

    def handle_endtag(self, tag: str) -> None:
        if tag not in _VOID and self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        name = next((n for n in reversed(self._open) if n), None)
        if name:
            self.fields[name] = self.fields.get(name, "") + data


def read_account(text: str) -> dict[str, str]:
    """What an account page shows (holder, number, balance), as whoever fetched it sees it; {} if none."""
    parser = _Fields()
    parser.feed(text)
    return {k: " ".join(v.split()) for k, v in parser.fields.items()}
