#!/usr/bin/env python3
"""Soak `keyformer serve` on loopback: mixed load for a bounded time, then the figures.

    scripts/soak-server.py [--minutes 30] [--concurrency 1,4,8] [--model smollm2-135m] [--out FILE]

The load mixes, at each concurrency in turn: normal requests (completions and chats, streamed
or not, under the full cache and under KV policies, at temperature 0), cancelled ones (the
client drops the connection after a few streamed chunks), malformed bodies and oversized
ones. It reports:
- requests lost: a request (not cancelled by us) that got no HTTP response;
- answers that differ from the same request sent alone before the load (temperature 0);
- RSS growth from the end of the warm-up to the end (the server's resident memory);
- KV bytes in use, running sequences and requests in flight once the load stops (0 each);
- p50 / p99 latency of normal requests;
- a kill -9 in the middle of the load, then a restart: it starts and answers as before.
Exit status 1 when a figure misses its target (lost 0, differing 0, RSS growth <= 5%,
everything back to 0, a clean restart). Loopback only; no more than --max-requests requests.
"""

import argparse
import concurrent.futures
import http.client
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "The three primary colours are",
    ("The history of the printing press begins in the fifteenth century, when movable type changed how "
     "books were made, how ideas travelled and how people learned to read. ") * 5 + "In short,",
]
KV = [None, {"policy": "keyformer", "budget": "50%", "min_budget": 16}, {"policy": "h2o", "budget": 48}]


class Server:
    def __init__(self, bin_path, args):
        self.proc = subprocess.Popen([bin_path, "serve", "--port", "0", *args], stderr=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, text=True)
        self.log = []
        deadline = time.time() + 300
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError("the server exited: " + "".join(self.log))
            self.log.append(line)
            m = re.search(r"listening on http://(\S+):(\d+)", line)
            if m:
                self.host, self.port = m.group(1), int(m.group(2))
                threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
                return
        raise RuntimeError("the server did not start")

    def rss_bytes(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def request(self, method, path, body=None, timeout=600):
        """(status, parsed body) or raises on no response."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            raw = r.read()
            try:
                return r.status, json.loads(raw)
            except ValueError:
                return r.status, raw.decode(errors="replace")
        finally:
            conn.close()

    def stream_text(self, path, body, timeout=600):
        """A streamed answer joined; raises on no response."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            if r.status != 200:
                return r.status, r.read().decode(errors="replace")
            text = []
            for line in r:
                line = line.decode().strip()
                if line == "data: [DONE]":
                    return 200, "".join(text)
                if not line.startswith("data: "):
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    return 500, ev
                for c in ev.get("choices", []):
                    text.append(c.get("text") or (c.get("delta") or {}).get("content") or "")
            # The stream ended without [DONE]: the answer never arrived whole.
            raise http.client.IncompleteRead(b"".join(t.encode() for t in text))
        finally:
            conn.close()

    def cancel_after_chunks(self, path, body, chunks=2):
        s = socket.create_connection((self.host, self.port), timeout=60)
        data = json.dumps(body).encode()
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        seen = b""
        while seen.count(b"data: ") < chunks:
            part = s.recv(4096)
            if not part:
                break
            seen += part
        s.close()

    def metrics(self):
        _, text = self.request("GET", "/metrics", timeout=60)
        return {l.split()[0]: float(l.split()[1]) for l in text.splitlines() if l and not l.startswith("#")}

    def stop(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=120)


def body_of(case, stream):
    prompt, kv, chat = case
    b = {"max_tokens": 24, "temperature": 0, "stream": stream}
    if chat:
        b["messages"] = [{"role": "user", "content": prompt}]
    else:
        b["prompt"] = prompt
    if kv:
        b["kv_cache"] = kv
    return ("/v1/chat/completions" if chat else "/v1/completions"), b


def answer(server, case, stream):
    path, body = body_of(case, stream)
    if stream:
        return server.stream_text(path, body)
    status, r = server.request("POST", path, body)
    if status != 200:
        return status, r
    c = r["choices"][0]
    return status, c.get("text") if "text" in c else c["message"]["content"]


MALFORMED = [
    b"{not json",
    b'{"prompt": 5}',
    b'{"prompt": "x", "max_tokens": "ten"}',
    b'{"prompt": "x", "kv_cache": {"policy": "lru", "budget": 8}}',
    b'{"prompt": "x", "kv_cache": {"policy": "h2o", "budget": 4, "recent": 0}, "max_tokens": 4}',
    b'{"messages": []}',
    b'{"prompt": "x", "response_format": {"type": "json_object"}}',
    b"[" * 300 + b"]" * 300,
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.environ.get("KEYFORMER_BIN", "target/release/keyformer"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--warmup-minutes", type=float, default=None, help="default: a tenth of --minutes, at most 3")
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--max-requests", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", help="also write the report as JSON here")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    levels = [int(c) for c in a.concurrency.split(",")]
    server_args = ["-m", a.model, "--kv-memory", "512M", "--max-batch", "8", "--max-queue", "64", "--timeout", "300"]
    server = Server(a.bin, server_args)

    cases = [(p, kv, chat) for p in PROMPTS for kv in KV for chat in (False, True)]
    reference = {}
    for case in cases:
        status, text = answer(server, case, False)
        assert status == 200, (case, text)
        reference[json.dumps(case)] = text
    print(f"soak: {len(cases)} reference answers taken one at a time", file=sys.stderr)

    killing = threading.Event()
    stats = {"sent": 0, "lost": 0, "differ": 0, "cancelled": 0, "malformed_ok": 0, "malformed_bad": 0,
             "oversized_ok": 0, "oversized_bad": 0, "status": {}}
    latencies = []
    lock = threading.Lock()
    differ_examples = []

    def one(worker_rng):
        kind = worker_rng.random()
        try:
            if kind < 0.70:
                case = cases[worker_rng.randrange(len(cases))]
                stream = worker_rng.random() < 0.5
                t = time.time()
                status, text = answer(server, case, stream)
                dt = time.time() - t
                with lock:
                    stats["status"][status] = stats["status"].get(status, 0) + 1
                    if status == 200 and not killing.is_set():
                        latencies.append(dt)
                        if text != reference[json.dumps(case)]:
                            stats["differ"] += 1
                            differ_examples.append((case, text))
            elif kind < 0.80:
                path, body = body_of(cases[worker_rng.randrange(len(cases))], True)
                body["max_tokens"] = 200
                server.cancel_after_chunks(path, body)
                with lock:
                    stats["cancelled"] += 1
            elif kind < 0.95:
                bad = MALFORMED[worker_rng.randrange(len(MALFORMED))]
                status, r = server.request("POST", "/v1/completions", bad)
                ok = (400 <= status < 500 and isinstance(r, dict) and "error" in r) or status == 200
                with lock:
                    stats["malformed_ok" if ok else "malformed_bad"] += 1
            else:
                status, r = server.request("POST", "/v1/completions", b'{"prompt": "' + b"x" * (5 << 20) + b'"}')
                with lock:
                    stats["oversized_ok" if status in (400, 413) else "oversized_bad"] += 1
        except (OSError, http.client.HTTPException) as e:
            with lock:
                stats["lost"] += 1
                stats.setdefault("lost_examples", []).append(repr(e)[:200])

    def load(seconds, level, count_limit):
        deadline = time.time() + seconds

        def worker(i):
            worker_rng = random.Random(rng.random())
            while time.time() < deadline:
                with lock:
                    if stats["sent"] >= count_limit:
                        return
                    stats["sent"] += 1
                one(worker_rng)

        with concurrent.futures.ThreadPoolExecutor(max_workers=level) as pool:
            list(pool.map(worker, range(level)))

    total = a.minutes * 60
    warmup = a.warmup_minutes * 60 if a.warmup_minutes is not None else min(total / 10, 180)
    load(warmup, max(levels), a.max_requests)
    rss_warm = server.rss_bytes()
    print(f"soak: warm-up done, RSS {rss_warm / 2**20:.1f} MiB", file=sys.stderr)
    start = time.time()
    phase = max(30.0, (total - warmup) / (3 * len(levels)))
    while time.time() - start < total - warmup and stats["sent"] < a.max_requests:
        for level in levels:
            left = total - warmup - (time.time() - start)
            if left <= 0:
                break
            load(min(phase, left), level, a.max_requests)
            print(f"soak: {time.time() - start:.0f} s, {stats['sent']} requests, concurrency {level}, "
                  f"RSS {server.rss_bytes() / 2**20:.1f} MiB, lost {stats['lost']}, differ {stats['differ']}",
                  file=sys.stderr)
    # Idle: every gauge back to 0.
    time.sleep(2)
    m = server.metrics()
    rss_end = server.rss_bytes()
    gauges = {k: m.get(f"keyformer_{k}", -1) for k in
              ("kv_bytes_in_use", "kv_bytes_reserved", "requests_running", "requests_in_flight", "queue_depth")}

    # kill -9 under load, then a restart that must answer as before. Requests cut by the kill
    # are counted apart from the lost ones.
    lost_before_kill = stats["lost"]
    killing.set()
    killer = threading.Thread(target=load, args=(8, max(levels), stats["sent"] + 1000))
    killer.start()
    time.sleep(4)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=60)
    killer.join()
    restarted = Server(a.bin, server_args)
    case = cases[0]
    status, text = answer(restarted, case, False)
    restart_ok = status == 200 and text == reference[json.dumps(case)]
    restarted.stop()

    lat = sorted(latencies)
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")
    growth = (rss_end - rss_warm) / rss_warm if rss_warm else float("nan")
    report = {
        "minutes": a.minutes, "concurrency": levels, "requests": stats["sent"],
        "normal_answers": len(lat), "lost": lost_before_kill, "cut_by_kill9": stats["lost"] - lost_before_kill,
        "differ": stats["differ"], "cancelled": stats["cancelled"],
        "malformed": {"answered_4xx": stats["malformed_ok"], "other": stats["malformed_bad"]},
        "oversized": {"refused": stats["oversized_ok"], "other": stats["oversized_bad"]},
        "statuses": {str(k): v for k, v in stats["status"].items()}, "p50_s": q(0.50), "p99_s": q(0.99),
        "rss_warm_mib": rss_warm / 2**20, "rss_end_mib": rss_end / 2**20, "rss_growth": growth,
        "gauges_at_end": gauges, "restart_after_kill9_answers_as_before": restart_ok,
        "lost_examples": stats.get("lost_examples", [])[:5],
    }
    print(json.dumps(report, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
    ok = (report["lost"] == 0 and report["differ"] == 0 and growth <= 0.05 and all(v == 0 for v in gauges.values()) and restart_ok
          and stats["malformed_bad"] == 0 and stats["oversized_bad"] == 0)
    for case, text in differ_examples[:3]:
        print("differs:", case, repr(text)[:200], file=sys.stderr)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
