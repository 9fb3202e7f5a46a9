"""`python -m bench`: run every bench module found in this package, one after the other.

    .venv/bin/python -m bench [--quick] [--json] [--only edge,dns] [-- ARGS for every module]

bench.edge runs first, then the others by name. Each module runs as its own process
(`python -m bench.NAME`), so each one's cleanup stays its own; --quick and --json are
passed to the modules whose --help offers them. Exit status: the worst of the modules'.
"""
from __future__ import annotations

import argparse
import pkgutil
import re
import signal
import subprocess
import sys
from pathlib import Path

FIRST = ("edge",)


def modules() -> list[str]:
    found = [m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])
             if not m.name.startswith("_") and not m.ispkg]
    return [n for n in FIRST if n in found] + sorted(n for n in found if n not in FIRST)


def offers(name: str, flag: str, cache: dict[str, str]) -> bool:
    if name not in cache:
        r = subprocess.run([sys.executable, "-m", f"bench.{name}", "--help"], capture_output=True, text=True, timeout=60)
        cache[name] = r.stdout if r.returncode == 0 else ""
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", cache[name]) is not None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="pass --quick to the modules that have it")
    p.add_argument("--json", action="store_true", help="pass --json to the modules that have it")
    p.add_argument("--only", metavar="NAMES", help="comma-separated module names (default: all)")
    p.add_argument("--list", action="store_true", help="list the bench modules and exit")
    args = p.parse_args(argv)
    names = modules()
    if args.list:
        print("\n".join(names))
        return 0
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            p.error(f"no bench module {', '.join(unknown)} (have: {', '.join(names)})")
        names = [n for n in names if n in wanted]
    helps: dict[str, str] = {}
    worst = 0
    for name in names:
        cmd = [sys.executable, "-m", f"bench.{name}"]
        for flag in ("--quick", "--json"):
            if getattr(args, flag[2:]):
                if offers(name, flag, helps):
                    cmd.append(flag)
                else:
                    print(f"bench: bench.{name} has no {flag}; running it without", file=sys.stderr)
        cmd += extra
        print(f"bench: {' '.join(['python', '-m', f'bench.{name}'] + cmd[3:])}", file=sys.stderr, flush=True)
        child = subprocess.Popen(cmd)
        old = signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
        try:
            rc = child.wait()
        except KeyboardInterrupt:  # the child got the same Ctrl-C: let it clean up
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
            return 130
        finally:
            signal.signal(signal.SIGTERM, old)
        if rc:
            print(f"bench: bench.{name} exited with {rc}", file=sys.stderr)
        worst = max(worst, rc if rc > 0 else 1 if rc else 0)
    return worst


if __name__ == "__main__":
    raise SystemExit(main())
