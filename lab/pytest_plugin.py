"""pytest plugin: scenario files are tests, one per (scenario, model[, engine]).

Enabled by the `pytest11` entry point. Collects `*.toml` under the directories of the
`sni_lab_scenarios` ini option or `--sni-lab-scenarios DIR` (never `workshop/`). The lab
runs in-process on free ports, in a background thread with its own event loop, so plain
tests, async tests and scenario items can all share it through the `lab` fixture.
"""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from lab.models import FLAVOURS
from lab.run import ENGINES, Lab
from lab.scenarios import Runner, ScenarioError, load
from lab.target import TargetError, check_answers, parse_edges
from lab.topology import MODELS, WorldError
from lab.world import load as load_world


def pytest_addoption(parser) -> None:
    group = parser.getgroup("sni-lab")
    group.addoption("--sni-lab-scenarios", action="append", metavar="DIR", default=[],
                    help="collect sni-lab scenario files (*.toml) from DIR")
    group.addoption("--sni-lab-engines", metavar="E[,E]", default="native",
                    help="engines to run scenarios on: native, mitmproxy (default: native)")
    group.addoption("--sni-lab-models", metavar="M[,M]", default=",".join(MODELS),
                    help="models to run scenarios under (default: all)")
    group.addoption("--sni-lab-config", metavar="PATH", help="world file (default: the packaged lab.toml)")
    group.addoption("--sni-lab-edge", action="append", metavar="NAME=HOST:PORT", default=[],
                    help="run the cases against another edge (yours): where the world's listener NAME is on it "
                         "(repeatable); judged verdict first under --sni-lab-flavour")
    group.addoption("--sni-lab-flavour", default="deployed", choices=tuple(FLAVOURS),
                    help="with --sni-lab-edge: what its config claims (default: deployed)")
    group.addoption("--sni-lab-certs", metavar="DIR", default="certs",
                    help="with --sni-lab-edge: the lab CA its certificates come from (default: certs/)")
    parser.addini("sni_lab_scenarios", "directories of sni-lab scenario files", type="paths", default=[])


def _scenario_dirs(config) -> list[Path]:
    dirs = [Path(d).resolve() for d in config.getoption("--sni-lab-scenarios")]
    return dirs + [Path(d).resolve() for d in config.getini("sni_lab_scenarios")]


def _csv(config, option: str, allowed: tuple[str, ...]) -> list[str]:
    items = [v.strip() for v in config.getoption(option).split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise pytest.UsageError(f"{option}: unknown {', '.join(bad)} (choose from {', '.join(allowed)})")
    return items


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "sni_lab: a scenario case collected from an sni-lab scenario file")
    config._sni_lab = _Labs(config)


def pytest_unconfigure(config) -> None:
    labs = getattr(config, "_sni_lab", None)
    if labs is not None:
        labs.close()


def pytest_collect_file(file_path: Path, parent):
    if file_path.suffix != ".toml" or "workshop" in file_path.parts:
        return None
    for directory in _scenario_dirs(parent.config):
        if file_path.resolve().parent == directory:
            return ScenarioFile.from_parent(parent, path=file_path, root=directory)
    return None


class ScenarioFile(pytest.File):
    def __init__(self, *, root: Path, **kw) -> None:
        super().__init__(**kw)
        self.root = root

    def collect(self):
        labs: _Labs = self.config._sni_lab
        try:
            scenario = load(self.path, labs.world, self.root)
        except ScenarioError as e:
            raise self.CollectError(str(e)) from None
        if labs.target is not None:  # another edge: one case per scenario, under its flavour
            yield ScenarioItem.from_parent(self, name=f"{scenario.name}[{labs.target.flavour}]", scenario=scenario,
                                           model=labs.target.flavour, engine=labs.target.name)
            return
        engines = _csv(self.config, "--sni-lab-engines", ENGINES)
        for engine in engines:
            for model in _csv(self.config, "--sni-lab-models", MODELS):
                suffix = f"[{model}]" + (f"[{engine}]" if len(engines) > 1 else "")
                yield ScenarioItem.from_parent(self, name=scenario.name + suffix, scenario=scenario, model=model,
                                               engine=engine)


class ScenarioFailed(Exception):
    pass


class ScenarioItem(pytest.Item):
    def __init__(self, *, scenario, model: str, engine: str, **kw) -> None:
        super().__init__(**kw)
        self.scenario, self.model, self.engine = scenario, model, engine
        self.add_marker(pytest.mark.sni_lab)

    def runtest(self) -> None:
        result = self.config._sni_lab.run_case(self.scenario, self.model, self.engine)
        self.user_properties.append(("verdict", result.verdict))
        if result.not_applicable:
            pytest.skip(f"not applicable to {self.engine}: {result.not_applicable}")
        if not result.passed:
            raise ScenarioFailed(result)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ScenarioFailed):
            from lab.explain import explain

            result = excinfo.value.args[0]
            return f"{result.failure}\n\n" + explain(result, self.scenario.story, self.scenario.lesson)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, 0, f"scenario {self.name}: {self.scenario.title}"


class LabThread:
    """A Lab on free ports, serving from its own thread's event loop."""

    def __init__(self, world, engine: str, target=None, certs: str | None = None) -> None:
        """`target`: another edge; the lab then runs no edge of its own, and its origins are where the
        world file says (that edge's config points there)."""
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"sni-lab-{engine}", daemon=True)
        self.thread.start()
        if target is None:
            self.lab = Lab.ephemeral(world, engine=engine)
        else:
            self.call(check_answers(target))
            self.lab = target.lab(world, certs)
        self.call(self.lab.start())
        endpoints = target.endpoints(self.lab.endpoints) if target else {**self.lab.endpoints, "engine": engine}
        self.runner = Runner(endpoints, self.lab.world, engine, target=target)

    @property
    def endpoints(self) -> dict:
        return self.lab.endpoints

    @property
    def world(self):
        return self.lab.world

    def call(self, coro, timeout: float = 60):
        """Run a coroutine on the lab's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run_case(self, scenario, model: str):
        async def case():
            async with self.runner.session() as api:
                (result,) = await self.runner.run_scenario(api, scenario, (model,))
                return result
        return self.call(case())

    def close(self) -> None:
        try:
            self.call(self.lab.stop(), 10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()


class _Labs:
    """One LabThread per engine, started on first use, stopped at the end of the session."""

    def __init__(self, config) -> None:
        try:
            self.world = load_world(config.getoption("--sni-lab-config"))
        except WorldError as e:
            raise pytest.UsageError(str(e)) from None
        self.target = None
        self.certs = config.getoption("--sni-lab-certs")
        if config.getoption("--sni-lab-edge"):
            try:
                self.target = parse_edges(config.getoption("--sni-lab-edge"), self.world,
                                          flavour=config.getoption("--sni-lab-flavour"))
            except TargetError as e:
                raise pytest.UsageError(f"--sni-lab-edge: {e}") from None
        self.labs: dict[str, LabThread] = {}

    def get(self, engine: str = "native") -> LabThread:
        if engine not in self.labs:
            if self.target is not None and engine == self.target.name:
                try:
                    self.labs[engine] = LabThread(self.world, engine, self.target, self.certs)
                except TargetError as e:
                    pytest.exit(str(e), returncode=1)
            else:
                self.labs[engine] = LabThread(self.world, engine)
        return self.labs[engine]

    def run_case(self, scenario, model: str, engine: str):
        return self.get(engine).run_case(scenario, model)

    def close(self) -> None:
        for lab in self.labs.values():
            lab.close()
        self.labs.clear()


@pytest.fixture(scope="session")
def lab(pytestconfig) -> LabThread:
    """The whole world in-process on free ports: `.endpoints`, `.world`, `.lab`, `.call(coro)`."""
    return pytestconfig._sni_lab.get("native")
