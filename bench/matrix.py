"""`python -m bench.matrix`: the wall time of the whole catalog x models, per engine and both
engines together, and of `sni-lab edges matrix` on the real edges installed here.

What a CI user waits for. Each run is `sni-lab ... --fresh --json` in its own process (an
in-process lab on free ports, loopback only), bounded by a timeout; the figures are wall
time, cases and cases per second, and the ratio of the mitmproxy engine's time to the native
one's, measured side by side in this run.

    .venv/bin/python -m bench.matrix [--quick] [--json] [--repeat N]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

TIMEOUT = 600


def run(argv: list[str], tmp: str) -> dict:
    started = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "lab", *argv, "--json", "--certs", f"{tmp}/certs"],
                         capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp)
    wall = time.perf_counter() - started
    try:
        data = json.loads(res.stdout)
    except ValueError:
        return {"error": (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"], "wall_s": wall}
    cases = data["summary"]["cases"]
    return {"wall_s": round(wall, 2), "cases": cases, "cases_per_s": round(cases / wall, 1),
            "failed": data["summary"]["failed"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.matrix", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="only the scenarios tagged write-up, one repeat")
    p.add_argument("--json", action="store_true", help="one JSON document instead of the table")
    p.add_argument("--repeat", type=int, default=None, help="runs of each (default 2; --quick: 1)")
    args = p.parse_args(argv)
    repeat = args.repeat or (1 if args.quick else 2)
    tag = ["--tag", "write-up"] if args.quick else []
    runs = {
        "matrix native": ["matrix", "--fresh", "--engine", "native", *tag],
        "matrix mitmproxy": ["matrix", "--fresh", "--engine", "mitmproxy", *tag],
        "matrix both engines": ["matrix", "--fresh", "--engine", "native,mitmproxy", *tag],
        "edges matrix": ["edges", "matrix", *tag],
    }
    out: dict[str, list[dict]] = {name: [] for name in runs}
    live = not args.json and sys.stderr.isatty()
    with tempfile.TemporaryDirectory(prefix="sni-lab-bench-matrix-") as tmp:
        for i in range(repeat):
            for name, argv_ in runs.items():  # interleaved: a noisy moment hits every row alike
                if live:
                    print(f"\r{name} ({i + 1}/{repeat}) ...\033[K", end="", file=sys.stderr, flush=True)
                out[name].append(run(argv_, tmp))
    if live:
        print("\r\033[K", end="", file=sys.stderr)

    def best(name: str) -> dict:
        ok = [r for r in out[name] if "error" not in r]
        return min(ok, key=lambda r: r["wall_s"]) if ok else out[name][0]

    summary = {name: best(name) for name in runs}
    native, mitm = summary["matrix native"], summary["matrix mitmproxy"]
    ratio = (round(mitm["wall_s"] / native["wall_s"], 2) if "error" not in native and "error" not in mitm else None)
    if args.json:
        print(json.dumps({"runs": out, "best": summary, "mitmproxy_to_native_wall": ratio}, indent=2))
        return 0
    print(f"{'run':<22} {'cases':>6} {'wall (best)':>12} {'cases/s':>8}  all runs (s)")
    for name, r in summary.items():
        walls = ", ".join(f"{x['wall_s']:.1f}" for x in out[name])
        if "error" in r:
            print(f"{name:<22} {'-':>6} {'-':>12} {'-':>8}  {r['error'][0]}")
        else:
            print(f"{name:<22} {r['cases']:>6} {r['wall_s']:>10.1f} s {r['cases_per_s']:>8.1f}  {walls}"
                  + (f"  ({r['failed']} failed)" if r["failed"] else ""))
    if ratio is not None:
        print(f"mitmproxy engine / native engine, wall time of the same catalog: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
