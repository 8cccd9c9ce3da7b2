#!/usr/bin/env python3
"""A short concurrency check of `keyformer serve` on loopback, for any server arguments (a GPU
model split over shards among them): 96 requests from 16 clients, completions streamed or
not under the full cache, Keyformer and H2O, a quarter cancelled after two streamed chunks and
some malformed; then every request must have an answer (cancelled and malformed aside), the
server must hold no KV bytes, run no sequence and have nothing in flight, and it must stop
cleanly.

    scripts/serve-load-check.py [--bin BIN] SERVE_ARGS...
    e.g. KEYFORMER_TP_TRANSPORT=host scripts/serve-load-check.py --bin .gpu/keyformer \\
             --device cuda -tp 2 --random-weights tiny --kv-memory 64M --max-batch 8

Exit status 1 when a figure misses. The requests and the server come from soak-server.py.
"""

import concurrent.futures
import importlib.util
import os
import sys
import time

here = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("soak", os.path.join(here, "soak-server.py"))
soak = importlib.util.module_from_spec(spec)
spec.loader.exec_module(soak)


def main():
    argv = sys.argv[1:]
    binary = os.environ.get("KEYFORMER_BIN", "target/release/keyformer")
    if argv[:1] == ["--bin"]:
        binary, argv = argv[1], argv[2:]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 2
    t0 = time.time()
    server = soak.Server(binary, argv)
    print(f"serve-load-check: started in {time.time() - t0:.1f} s", file=sys.stderr)
    kvs = [None, {"policy": "keyformer", "budget": "50%", "min_budget": 16}, {"policy": "h2o", "budget": 48}]
    cases = [(p, kv, False) for p in soak.PROMPTS for kv in kvs]

    def one(i):
        case = cases[i % len(cases)]
        if i % 4 == 3:
            path, body = soak.body_of(case, True)
            server.cancel_after_chunks(path, body)
            return "cancelled", None
        if i % 9 == 8:
            status, _ = server.request("POST", "/v1/completions", soak.MALFORMED[i % len(soak.MALFORMED)])
            return "malformed", status
        status, text = soak.answer(server, case, i % 2 == 0)
        return ("answered" if status == 200 and isinstance(text, str) else "failed"), (status, text)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(96)))
    counts = {}
    for kind, _ in results:
        counts[kind] = counts.get(kind, 0) + 1
    time.sleep(1.0)
    m = server.metrics()
    left = {k: m.get(k, 0.0) for k in ("keyformer_kv_bytes_in_use", "keyformer_requests_running",
                                        "keyformer_requests_in_flight", "keyformer_queue_depth")}
    code = server.stop()
    print(f"requests: {counts}; after the load: {left}; exit status {code}; {time.time() - t0:.1f} s")
    failed = [r for k, r in results if k == "failed"][:3]
    if failed:
        print("failed:", failed)
    ok = not failed and all(v == 0 for v in left.values()) and code == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
