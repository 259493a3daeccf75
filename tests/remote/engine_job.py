"""Engine A, in a process of its own: store one request's blocks through the remote tier, then exit.

Usage: python engine_job.py '{"config": {...}, "seed": S, "request": R, "blocks": N}'
Prints the remote tier's counters as JSON.
"""
import importlib.util
import json
import sys
from pathlib import Path

from flexkv_runtime.control.ops import OpKind
from flexkv_runtime.runtime import KVRuntime

_RUNTIME_CONFTEST = Path(__file__).parent.parent / "runtime" / "conftest.py"
_spec = importlib.util.spec_from_file_location("runtime_helpers", _RUNTIME_CONFTEST)
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)


def main(args: dict) -> dict:
    with KVRuntime(args["config"], namespace=helpers.NS) as rt:
        rt.register_kv_caches(helpers.make_layers(seed=args["seed"]))
        keys = helpers.keys_for(args["request"], args["blocks"])
        assert rt.manager.plan_store("a", keys, list(range(len(keys)))) == len(keys)
        events = rt.flush(timeout=60)
        assert [(e.kind, e.failed_keys) for e in events] == [(OpKind.STORE, [])], events
        return rt.engine.stats().remote


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
