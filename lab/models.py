"""PURE: the edge models as data, one row each. `policy.decide` reads the row and never
compares a model's name.

A row says how a SaaS zone is routed and which controls apply:

- `by_listener`: does a SaaS zone's dedicated v1 address send every request to that zone,
  whatever its Host (v1 "Managed CNAME")? If not, the request is routed by its Host like
  any other request.
- `v1_allowlist`: v1 routing only for zones on the v1 allowlist; a zone configured for v1
  but not on the list is routed by Host.
- `host_allowlist`: on a v1-routed request, the WAF blocks (403) a host that is not one of
  the zone's authorized hostnames (its own names and its active custom hostnames).
- `trusts`: the custom hostname statuses that routing by Host sends to their SaaS zone.
  `active` has proven ownership; `pending` and `moved` have not (or no longer). A deleted
  registration is never trusted: it is history, not a claim.
- `sni_must_match_host`: Host/:authority must equal the SNI, else 421.

Every model shares Cloudflare's hostname priority (`PRIORITY`): among names that match
exactly, an *active* custom hostname beats the zone's own record; among wildcard matches
the zone wins. So a zone owner can hand www.victim.example to a SaaS by proving it (as
Cloudflare's O2O does), and a registration that proved nothing (pending, moved, blocked)
never takes a name another zone serves: if it did under `host`, any tenant could take
www.victim.example with one API call; that is not what the measured CDNs do, and it would
make `host` a strawman instead of the baseline. The price: v2 is only as strong as the
validation behind `active` (the control plane's multi-vantage validation, lab.control).

The certificate is the same in every model: chosen by SNI among one per zone (apex and
wildcard) and one per active custom hostname (`policy.certificate_names`). A registration
gets no certificate of its own: a CA validates control, the routing table does not.
"""
from __future__ import annotations

from dataclasses import dataclass

VERIFIED = ("active",)
REGISTERED = ("pending", "active", "moved")
PRIORITY = ("an exact active custom hostname", "the zone's own host (exact, then its wildcard)",
            "a custom hostname the model trusts, exact or wildcard")


@dataclass(frozen=True)
class Model:
    name: str
    by_listener: bool
    trusts: tuple[str, ...]
    v1_allowlist: bool = False
    host_allowlist: bool = False
    sni_must_match_host: bool = False
    protected: bool = False  # must never send a request to the wrong origin
    description: str = ""


TABLE = (
    Model("host", by_listener=False, trusts=REGISTERED,
          description="Routing by Host with no ownership proof: a custom hostname is routed as soon as it "
                      "is registered (pending and moved included), as 39 of 45 CDNs measured in 2024 did. "
                      "The baseline that shows what verification adds."),
    Model("v1", by_listener=True, trusts=VERIFIED,
          description="SSL for SaaS v1 (Managed CNAME): a SaaS zone's dedicated address sends every request "
                      "to the zone's origin, Host ignored. The write-up's flaw."),
    Model("v1-waf", by_listener=True, trusts=VERIFIED, v1_allowlist=True, host_allowlist=True, protected=True,
          description="The write-up's compensating controls: v1 routing only for zones on the v1 allowlist "
                      "(others as v2), and on it a WAF rule blocking a host the zone has not authorized."),
    Model("v2", by_listener=False, trusts=VERIFIED, protected=True,
          description="Cloudflare for SaaS: routing by Host among zones and active (verified) custom "
                      "hostnames; anything else is refused."),
    Model("v2-strict", by_listener=False, trusts=VERIFIED, sni_must_match_host=True, protected=True,
          description="v2, and the Host must be the SNI (421 Misdirected Request otherwise)."),
)
BY_NAME = {m.name: m for m in TABLE}
MODELS = tuple(BY_NAME)
PROTECTED = tuple(m.name for m in TABLE if m.protected)

# A real edge (nginx, Caddy, HAProxy, yours) has no model to switch: it runs a config. Its
# flavour names what that config claims, and the lab model it is compared with: `default`, a
# typical multi-tenant config (the v1 shape); `fixed`, the edge's own mechanisms plus a
# per-address host allowlist; `deployed`, an edge the lab did not configure (`--edge`),
# judged as one that claims to close the gap.
FLAVOURS = {"default": "v1", "fixed": "v2", "deployed": "v2"}
PROTECTED_FLAVOURS = ("fixed", "deployed")


def is_protected(model_or_flavour: str) -> bool:
    """Whether a MISROUTED case under this model or edge flavour fails whatever the file expects."""
    return model_or_flavour in PROTECTED or model_or_flavour in PROTECTED_FLAVOURS


def get(name: str) -> Model:
    """The row of a model (the world loader and the control plane reject unknown names first)."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r} (choose from {', '.join(MODELS)})") from None


def routing(m: Model) -> str:
    if not m.by_listener:
        return "by Host"
    if m.v1_allowlist:
        return "by the listener address if the zone is on the v1 allowlist, else by Host"
    return "by the listener address (Host ignored)"


def controls(m: Model) -> str:
    named = [("v1 zone allowlist", m.v1_allowlist), ("WAF host allowlist on the v1 address", m.host_allowlist),
             ("Host must equal SNI (421)", m.sni_must_match_host)]
    return "; ".join(label for label, on in named if on) or "none"


def markdown() -> str:
    """The model table as Markdown, for the docs and `explain`."""
    rows = ["| model | SaaS zone routed | custom hostnames routed by Host | controls | protected |",
            "|---|---|---|---|---|"]
    rows += [f"| `{m.name}` | {routing(m)} | {', '.join(m.trusts)} | {controls(m)} | {'yes' if m.protected else 'no'} |"
             for m in TABLE]
    rows.append("")
    rows += [f"- `{m.name}`: {m.description}" for m in TABLE]
    rows += ["", "Every model, routing by Host, tries in order: " + "; ".join(f"({i}) {p}" for i, p in
                                                                    enumerate(PRIORITY, 1)) + "."]
    return "\n".join(rows) + "\n"
