"""`python -m experiments COMMAND [args...]`: one entry point for every job.

Commands that are Hydra apps (sweep, replay, simulate) take Hydra overrides;
`bench NAME` runs one benchmark module from `experiments/bench/`.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys

from experiments import bench as _bench_pkg

APPS = {
    "fidelity": "experiments.fidelity",
    "replay": "experiments.replay",
    "research": "experiments.policy_research",
    "simulate": "experiments.simulate",
    "sweep": "experiments.sweep",
}


def _benches() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(_bench_pkg.__path__) if not m.name.startswith("_"))


def _usage() -> str:
    return (
        "usage: python -m experiments {" + ",".join(sorted(APPS)) + "} [hydra overrides...]\n"
        "       python -m experiments bench {" + ",".join(_benches()) + "} [args...]"
    )


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "bench":
        if not rest or rest[0] not in _benches():
            print(f"unknown benchmark {rest[0] if rest else ''!r}; choose one of {_benches()}", file=sys.stderr)
            return 2
        module = importlib.import_module(f"experiments.bench.{rest[0]}")
        return module.main(rest[1:]) or 0
    if command not in APPS:
        print(f"unknown command {command!r}\n{_usage()}", file=sys.stderr)
        return 2
    # Hydra reads sys.argv itself: hand it the overrides only.
    sys.argv = [f"experiments {command}", *rest]
    importlib.import_module(APPS[command]).main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
