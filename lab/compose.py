"""The lab as separate hosts: the world on a bridge, and the docker-compose.yml made from it.

`bridge_world` moves every actor from 127.0.0.N to host N of the world's `[compose]`
subnet, the edge to port 443 and the resolver to port 53, as a real edge and a system
resolver listen. `render` writes the Compose file (`sni-lab compose > docker-compose.yml`):
valid Compose Specification, run by `docker compose` (v2) and Debian's `docker-compose` 1.29.
Pure: no I/O; the containers' side is `lab.follow`.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import json

from lab.topology import Endpoint, World, WorldError

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
IMAGE = "sni-lab"
BRIDGE = "sni-lab0"  # the host's interface for the stack: what `ip route get` must name
# Paths inside the containers (the image makes them, owned by the lab user, so a new named
# volume mounted there starts owned by it too).
CERTS, SECRET, TRUST, STATE, WORLD = "/lab/certs", "/lab/secret", "/lab/trust", "/lab/state", "/lab/world.toml"
TOKEN = f"{SECRET}/token"
CA = f"{TRUST}/ca.pem"
ROLES = ("init", "control", "resolver", "edge", "origin")  # `sni-lab compose --role`
READY = "/tmp/sni-lab-ready"  # a follower writes it once it serves what the control plane says


def bridge_address(world: World, host: str, key: str) -> str:
    """127.0.0.N -> host N of the subnet. Fixed addresses live in the subnet's lower half;
    the upper half is Docker's for `compose run` containers (and the gateway, its last host)."""
    net = ipaddress.ip_network(world.compose.subnet)
    addr = ipaddress.ip_address(host)
    if addr not in LOOPBACK:
        raise WorldError(f"{world.source}: {key}: {host} is not a 127.0.0.0/8 address; the compose stack "
                         f"maps 127.0.0.N to host N of compose.subnet")
    n = int(addr) - int(LOOPBACK.network_address)
    if not 0 < n < net.num_addresses // 2:
        raise WorldError(f"{world.source}: {key}: {host} does not fit the lower half of compose.subnet "
                         f"{net} (host {n}; the upper half is left to Docker)")
    return str(net.network_address + n)


def gateway(world: World) -> str:
    net = ipaddress.ip_network(world.compose.subnet)
    return str(net.broadcast_address - 1)


def dynamic_range(world: World) -> str:
    net = ipaddress.ip_network(world.compose.subnet)
    return str(list(net.subnets(prefixlen_diff=1))[1])


def bridge_world(world: World) -> World:
    """The world as the containers see it: every actor at its bridge address."""
    c = world.compose
    listeners = tuple(dataclasses.replace(l, host=bridge_address(world, l.host, f"listener {l.name}"), port=c.edge_port)
                      for l in world.listeners)
    origins = tuple(dataclasses.replace(o, host=bridge_address(world, o.host, f"origin.{o.name}"))
                    for o in world.origins)
    resolver = Endpoint(bridge_address(world, world.resolver.host, "resolver.host"), c.dns_port)
    control = Endpoint(bridge_address(world, world.control.host, "control.host"), world.control.port)
    vantages = tuple(bridge_address(world, v, f"control.vantages[{i}]") for i, v in enumerate(world.vantages))
    clients = tuple((n, bridge_address(world, a, f"clients.{n}")) for n, a in world.clients)
    moved = dataclasses.replace(world, listeners=listeners, origins=origins, resolver=resolver, control=control,
                                vantages=vantages, clients=clients)
    seen: dict[str, str] = {}
    for label, host in [*((f"listener {l.name}", l.host) for l in listeners), *((f"origin.{o.name}", o.host) for o in origins),
                        ("resolver", resolver.host), ("control", control.host),
                        *((f"control vantage {i}", v) for i, v in enumerate(vantages))]:
        if host in seen:
            raise WorldError(f"{world.source}: {label}: bridge address {host} is also {seen[host]}'s; on the bridge "
                             f"every actor (and every listener, all on port {c.edge_port}) needs an address of its own")
        seen[host] = label
    return moved


# ---- the file -------------------------------------------------------------------------

def _service(command: list[str], address: str | None, volumes: list[str], health: list[str], depends: dict[str, str],
             **extra) -> dict:
    svc = {"image": IMAGE, "command": command}
    if address is None:
        svc["network_mode"] = "none"
    else:
        svc["networks"] = {"lab": {"ipv4_address": address}} if address else ["lab"]
    if volumes:
        svc["volumes"] = volumes
    svc.update(extra)
    if health:
        svc["healthcheck"] = {"test": health, "interval": "2s", "timeout": "3s", "retries": 30}
    if depends:
        svc["depends_on"] = {name: {"condition": cond} for name, cond in depends.items()}
    return svc


def services(world: World, config: str | None = None) -> dict:
    """The Compose file as data. `config`: a world file to mount (default: the packaged one)."""
    bw = bridge_world(world)
    role = lambda *r: ["sni-lab", "compose", "--role", *r] + (["--config", WORLD] if config else [])
    world_mount = [f"{config}:{WORLD}:ro"] if config else []
    ready = ["CMD", "test", "-f", READY]
    edge_host = bw.listeners[0].host
    aliases = sorted({l.host for l in bw.listeners} - {edge_host})
    origins = {f"origin-{o.name}": o for o in bw.origins}
    after_control = {"control": "service_healthy"}
    svcs = {
        "init": _service(role("init"), None, [f"certs:{CERTS}", f"secret:{SECRET}", f"trust:{TRUST}", *world_mount],
                         [], {}, build={"context": ".", "args": {"BASE": "${SNI_LAB_BASE:-python:3.12-slim}"}}),
        # The verifier asks from several vantage addresses that must agree: aliases of the control
        # container, added by its entrypoint as the edge's listener addresses are.
        "control": _service(role("control"), bw.control.host,
                            [f"secret:{SECRET}:ro", f"trust:{TRUST}:ro", f"state:{STATE}", *world_mount],
                            ["CMD", "curl", "-sf", "-o", "/dev/null", f"http://{bw.control.host}:{bw.control.port}/health"],
                            {"init": "service_completed_successfully"},
                            ports=[f"127.0.0.1:{world.control.port}:{bw.control.port}"],
                            user="0", cap_add=["NET_ADMIN"], environment={"LAB_ADDRESSES": " ".join(bw.vantages)}),
        "resolver": _service(role("resolver"), bw.resolver.host, [f"secret:{SECRET}:ro", *world_mount], ready,
                             after_control, sysctls={"net.ipv4.ip_unprivileged_port_start": 0}),
        # The collector serves https (a lab leaf) and verifies the victim's edge on replay: it needs the certs.
        **{name: _service(role("origin", o.name), o.host,
                          [*([f"certs:{CERTS}"] if o.kind == "collector" else []), f"secret:{SECRET}:ro", *world_mount],
                          ready, after_control)
           for name, o in origins.items()},
        "edge": _service(role("edge"), edge_host, [f"certs:{CERTS}", f"secret:{SECRET}:ro", *world_mount], ready,
                         {**after_control, **{name: "service_healthy" for name in origins}},
                         user="0", cap_add=["NET_ADMIN"], environment={"LAB_ADDRESSES": " ".join(aliases)},
                         sysctls={"net.ipv4.ip_unprivileged_port_start": 0}),
        "client": _service(["bash"], "", [f"trust:{TRUST}:ro", *world_mount], [],
                           {"edge": "service_healthy", "resolver": "service_healthy"},
                           user="0", dns=[bw.resolver.host], environment={"LAB_TRUST": CA},
                           profiles=["client"]),
    }
    return {
        "services": svcs,
        "networks": {"lab": {
            "driver": "bridge",
            "driver_opts": {"com.docker.network.bridge.name": BRIDGE},
            "ipam": {"config": [{"subnet": world.compose.subnet, "ip_range": dynamic_range(world),
                                 "gateway": gateway(world),
                                 # the edge's extra listener addresses: Docker must never give them away
                                 "aux_addresses": {**{l.name: l.host for l in bw.listeners if l.host in aliases},
                                                   **{f"vantage-{i}": v for i, v in enumerate(bw.vantages)}}}]},
        }},
        "volumes": {"certs": {}, "secret": {}, "trust": {}, "state": {}},
    }


def header(world: World) -> str:
    bw = bridge_world(world)
    lines = [
        "Generated by `sni-lab compose` from the world file: edit the world, then run",
        "`sni-lab compose > docker-compose.yml` (a test fails when this file differs).",
        "",
        "The lab as separate hosts on one bridge, " + world.compose.subnet + f" (host interface {BRIDGE}):",
        "127.0.0.N of the local mode is host N here. The client's system resolver is the lab",
        "resolver (Docker's embedded resolver forwards to it), and its system trust store holds",
        "the lab CA, so a plain `curl https://www.victim.example/` follows DNS, poisoned or not.",
        "",
    ]
    actors = [(f"edge {l.name}", f"{l.host}:{l.port}" + (f"  (v1 address of {l.zone})" if l.zone else ""))
              for l in bw.listeners]
    actors += [(f"origin {o.name}", f"{o.host}:{o.port}") for o in bw.origins]
    actors += [("resolver", f"{bw.resolver.host}:{bw.resolver.port} udp+tcp"),
               ("control", f"{bw.control.host}:{bw.control.port}, published on 127.0.0.1:{world.control.port} only")]
    width = max(len(a) for a, _ in actors)
    lines += [f"  {a:<{width}}  {where}" for a, where in actors]
    lines += ["",
              "The image is built once, by the init service: `docker compose build` (BASE: any",
              "Debian-family image with Python >= 3.11; default python:3.12-slim, another with",
              "SNI_LAB_BASE=image). Every other service runs that image; all start after init.",
              "",
              "The edge holds every listener address on this one network: its own address, and the",
              "others added in its network namespace (aux_addresses keep Docker from handing them",
              "out). One network, because an edge's addresses are reached from one place; with one",
              "network per address every client would need a leg on each, and Docker isolates",
              "bridges from each other. Adding them needs NET_ADMIN, which the entrypoint gives up",
              "(with root) before the lab runs.",
              "",
              "  docker compose build && docker compose up -d",
              "  docker compose logs control             # the live page's URL, with its token",
              "  docker compose run --rm client curl -s https://www.victim.example/",
              "  docker compose run --rm client sni-lab matrix",
              "  docker compose down -v                  # also forgets the CA, the token and the state"]
    return "\n".join(f"# {line}".rstrip() for line in lines) + "\n"


def render(world: World, config: str | None = None) -> str:
    return header(world) + _yaml(services(world, config))


def _yaml(value, indent: int = 0) -> str:
    """Block-style YAML; every scalar a JSON scalar (a valid YAML flow scalar), so nothing is
    read as a date, a boolean or an octal number."""
    pad = "  " * indent
    out = []
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, (dict, list)) and len(json.dumps(v)) > 70 - len(pad) - len(k):
                out.append(f"{pad}{k}:\n{_yaml(v, indent + 1)}")
            else:
                out.append(f"{pad}{k}: {_scalar(v)}\n")
    else:
        for v in value:
            if isinstance(v, (dict, list)) and len(json.dumps(v)) > 70 - len(pad):
                first, *rest = _yaml(v, indent + 1).splitlines(keepends=True)
                out.append(f"{pad}- {first.lstrip()}" + "".join(rest))
            else:
                out.append(f"{pad}- {_scalar(v)}\n")
    return "".join(out)


def _scalar(v) -> str:
    return json.dumps(v)  # short lists and tables too: JSON is YAML's flow style
