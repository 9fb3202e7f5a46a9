"""The runner joins each lookup to its request by trace and reads "poisoned, by which
override" from the resolver's own event, never by matching names to the overrides it made."""
from __future__ import annotations

import pytest

from lab.run import Lab
from lab.scenarios import Runner, load

SCENARIO = '''
title = "t"
story = "s"
lesson = "l"

[[setup.override]]
name = "www.victim.example"
type = "AAAA"
value = "::1"

[[setup.override]]
name = "www.victim.example"
type = "A"
value = "listener:saas2-v1"
client = "127.0.0.5"

[[request]]
resolve = "www.victim.example"
client = "127.0.0.5"

[[request]]
resolve = "www.victim.example"
client = "127.0.0.6"

[expect]
"*" = ["victim", "victim"]
'''


@pytest.fixture
async def fresh_lab(world, tmp_path):
    async with Lab(world.with_free_ports(), tmp_path / "certs", state_dir=tmp_path / "state", verify_interval=3600) as lab:
        yield lab


async def test_the_runner_reads_poisoning_from_the_event_of_its_own_lookup(fresh_lab, world, tmp_path):
    path = tmp_path / "poison.toml"
    path.write_text(SCENARIO)
    (case,) = await Runner(fresh_lab.endpoints, fresh_lab.world).run([load(path, world)], ("v1",))
    targeted, untouched = case.requests
    (event,) = [e for e in fresh_lab.events.trace(targeted.trace) if e["kind"] == "dns.answer"]
    assert event["client"] == "127.0.0.5" and event["answers"] == ["127.0.0.12"]
    # the targeted A override answered, not the first override made for the name
    assert targeted.dns == f"www.victim.example A 127.0.0.12 (poisoned by override {event['override']}) (asked from 127.0.0.5)"
    # an AAAA override does not poison an A lookup
    (event,) = [e for e in fresh_lab.events.trace(untouched.trace) if e["kind"] == "dns.answer"]
    assert not event["poisoned"] and untouched.dns == "www.victim.example A 127.0.0.10 (asked from 127.0.0.6)"
