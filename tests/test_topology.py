"""The world file: the default loads; each kind of mistake is one line naming file and key."""
import subprocess
import sys

import pytest

from lab.hostnorm import HostError, normalize
from lab.topology import WorldError
from lab.world import load


def test_default_world(world):
    assert world.model == "v1"
    assert {l.name: l.host for l in world.listeners} == {"anycast": "127.0.0.10", "saas-v1": "127.0.0.11",
                                                          "saas2-v1": "127.0.0.12", "spare-v1": "127.0.0.13"}
    saas = world.zone_by_name["saas.example"]
    assert saas.saas and saas.v1_allowlisted and saas.v1_listener == "saas-v1"
    # the file states the dedicated address once, on the zone; the listener's side is derived
    assert {l.name: l.zone for l in world.listeners} == {"anycast": None, "saas-v1": "saas.example",
                                                          "saas2-v1": "saas2.example", "spare-v1": None}
    assert not world.zone_by_name["saas2.example"].v1_allowlisted
    assert world.authorized_hosts(saas)[-1] == "shop.customer.example"
    assert world.address_of("listener:saas-v1") == "127.0.0.11"


def _broken(tmp_path, old, new):
    from lab.topology import default_path

    text = default_path().read_text()
    assert old in text
    path = tmp_path / "lab.toml"
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize("old,new,expected", [
    ('origin = "victim"', 'origin = "nowhere"', "zone[0].origin: unknown origin 'nowhere'"),
    ('host = "127.0.0.11"', 'host = "127.0.0.10"', "duplicate address 127.0.0.10:8443"),
    ('host = "127.0.0.31"', 'host = "127.0.0.300"', "origin.victim.host: not an IP address"),
    ('model = "v1"', 'model = "v3"', "lab.model: unknown model 'v3'"),
    ('v1_listener = "saas-v1"', 'v1_listener = "nope"', "zone[1].v1_listener: unknown listener 'nope'"),
    ('value = "listener:anycast"', 'value = "listener:nope"', "dns.record[0].value: unknown listener 'nope'"),
    ('port = 8443', 'port = "8443"', "listener[0].port: expected int, got str"),
    ('status = "active"', 'status = "verified"', "custom_hostname[0].status: unknown status 'verified'"),
    ('[[zone]]', '[[zone]\n', "not valid TOML"),
])
def test_broken_world_names_file_and_key(tmp_path, old, new, expected):
    path = _broken(tmp_path, old, new)
    with pytest.raises(WorldError) as e:
        load(path)
    assert str(path) in str(e.value)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


_SAAS_V1 = 'name = "saas-v1"\nhost = "127.0.0.11"\nport = 8443\n'


@pytest.mark.parametrize("old,new,expected", [
    # the older spelling of the v1 address, on the listener, must agree with the zone's
    (_SAAS_V1, _SAAS_V1 + 'zone = "saas2.example"\n',
     "listener[1].zone: saas2.example, but zone saas.example names it as its v1_listener; "
     "state it once, as the zone's v1_listener"),
    ('name = "anycast"\n', 'name = "anycast"\nzone = "victim.example"\n',
     "listener[0].zone: victim.example, but no zone names it as its v1_listener; "
     "state it once, as the zone's v1_listener"),
    ('v1_listener = "saas2-v1"', 'v1_listener = "saas-v1"',
     "zone[2].v1_listener: listener 'saas-v1' is already the v1 address of zone saas.example"),
    ('hosts = ["www.victim.example", "victim.example"]\n',
     'hosts = ["www.victim.example", "victim.example"]\nv1_listener = "anycast"\n',
     "zone[0].v1_listener: only a SaaS zone (saas = true) has a dedicated v1 address"),
])
def test_the_v1_address_is_one_fact(tmp_path, old, new, expected):
    path = _broken(tmp_path, old, new)
    with pytest.raises(WorldError) as e:
        load(path)
    assert str(e.value) == f"{path}: {expected}"


def test_the_older_listener_zone_is_read_when_it_agrees(tmp_path, world):
    path = _broken(tmp_path, _SAAS_V1, _SAAS_V1 + 'zone = "saas.example"\n')
    assert load(path).listeners == world.listeners


def test_missing_file():
    with pytest.raises(WorldError, match="no such file"):
        load("/nonexistent/lab.toml")


@pytest.mark.parametrize("raw,norm", [
    ("WWW.Victim.Example", "www.victim.example"), ("www.victim.example.", "www.victim.example"),
    ("www.victim.example:8443", "www.victim.example"), ("www.victim.example.:443", "www.victim.example"),
    ("bücher.example", "xn--bcher-kva.example"), ("127.0.0.1:80", "127.0.0.1"), ("[::1]:443", "::1"),
])
def test_normalize(raw, norm):
    assert normalize(raw) == norm


@pytest.mark.parametrize("raw", ["", "a b.example", "x.example:port", "[::1", "-bad.example", "a..example", "*.example"])
def test_normalize_rejects(raw):
    with pytest.raises(HostError):
        normalize(raw)


def test_cli_broken_world_one_line_exit_2(tmp_path):
    path = _broken(tmp_path, 'origin = "victim"', 'origin = "nowhere"')
    out = subprocess.run([sys.executable, "-m", "lab", "certs", "show", "--config", str(path), "--certs", str(tmp_path / "c")],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "unknown origin 'nowhere'" in out.stderr


def test_cli_help_version_and_certs_show(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "lab", *a], capture_output=True, text=True)
    assert "certs" in run("--help").stdout
    for cmd in (["certs", "--help"], ["up", "--help"], ["dig", "--help"], ["certs", "issue", "--help"]):
        assert run(*cmd).returncode == 0
    assert run("--version").stdout.startswith("sni-lab ")
    shown = run("certs", "show", "--certs", str(tmp_path), "--json")
    assert shown.returncode == 0
    import json
    items = json.loads(shown.stdout)
    assert items[0]["subject"] == "CN=sni-lab root CA,O=sni-lab" and len(items[0]["sha256"]) == 95
    issued = run("certs", "issue", "www.google.com", "--certs", str(tmp_path))
    assert issued.returncode == 2 and "outside the lab TLDs" in issued.stderr
    bad = run("up", "--model", "v9")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_rule_that_does_not_compile_is_rejected_at_load(tmp_path):
    path = _broken(tmp_path, 'v1_allowlisted = true        # on the v1 allowlist: keeps v1 routing under v1-waf',
                   'v1_allowlisted = true\n\n[[zone.rule]]\nid = "broken"\nexpression = "http.host == "')
    with pytest.raises(WorldError) as e:
        load(path)
    assert "zone saas.example rule 'broken'" in str(e.value) and str(path) in str(e.value)
    assert "Syntax error" in str(e.value) and "\n" not in str(e.value)


def test_with_zones_checks_as_the_loader_does_and_keeps_the_file_zones(world):
    import dataclasses

    from lab.topology import Zone

    new = Zone("saas3.example", "saas2", ("saas3.example", "app.saas3.example"), saas=True, v1_listener="spare-v1")
    w = world.with_zones((new,))
    assert [z.name for z in w.zones][-1] == "saas3.example" and w.zone_by_name["saas3.example"].added
    assert "saas3.example" in w.dns_zones and w.listener_by_name["spare-v1"].zone == "saas3.example"
    assert w.with_zones(()).zones == world.zones and w.with_zones(()).listener_by_name["spare-v1"].zone is None
    for bad, message in [(dataclasses.replace(new, name="victim.example"), "duplicate name"),
                         (dataclasses.replace(new, hosts=("app.saas.example",)), "duplicate host"),
                         (dataclasses.replace(new, v1_listener="saas-v1"), "already the v1 address"),
                         (dataclasses.replace(new, origin="nowhere"), "unknown origin")]:
        with pytest.raises(WorldError, match=message):
            world.with_zones((bad,))


def test_vantages_and_block_list(world):
    import tomllib

    from lab.topology import default_path, parse

    assert world.vantages == ("127.0.0.41", "127.0.0.42", "127.0.0.43")
    assert world.blocked("www.bank.test") and world.blocked("bank.test") and not world.blocked("notbank.test")
    for vantages, message in [(["127.0.0.41"], "control.vantages: multi-vantage validation needs at least 2"),
                              (["127.0.0.41", "nope"], "control.vantages[1]: not an IP address")]:
        data = tomllib.loads(default_path().read_text())
        data["control"]["vantages"] = vantages
        with pytest.raises(WorldError) as e:
            parse(data, "w.toml")
        assert str(e.value).startswith(f"w.toml: {message}")
