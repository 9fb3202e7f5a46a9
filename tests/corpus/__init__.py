"""The hostile corpus: inputs a probe of the running lab sent, per protocol, each with what must happen.

Every input is a `Case`: an id (named in a failure), its class, what to send (protocol
specific, see each module) and the answer expected, written from the issue and the RFCs,
never from what the code does today. Generated where that is natural (size ladders,
smuggling shapes, frame sequences, packets), seeded so the corpus is the same every run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Case:
    id: str
    send: Any
    expect: Any
    why: str = ""  # the issue item or RFC the expectation comes from
    opts: dict = field(default_factory=dict, hash=False, compare=False)


def unique(cases: list[Case]) -> list[Case]:
    ids = [c.id for c in cases]
    dup = {i for i in ids if ids.count(i) > 1}
    assert not dup, f"duplicate corpus ids: {sorted(dup)}"
    return cases
