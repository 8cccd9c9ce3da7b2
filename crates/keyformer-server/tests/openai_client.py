"""`keyformer serve` through OpenAI's own Python client, against `keyformer run`.

Run by scripts/test-server.sh (which installs the `openai` package): starts real servers on
loopback and checks that
- completions and chat completions, streamed or not, at temperature 0 equal `keyformer run`'s
  text for the same prompt and KV settings, also with many requests at once;
- bad input gets a 4xx with OpenAI's error object and the server keeps serving;
- the API key, the bounded queue (429), client disconnects and graceful shutdown work;
- a random-weights server (`--random-weights tiny`, byte-level tokenizer) takes token-id
  prompts and answers as `keyformer run --random-weights tiny` does for the same bytes.
"""

import concurrent.futures
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai

BIN = os.environ.get("KEYFORMER_BIN", "target/release/keyformer")
MODEL_NAME = "smollm2-135m"


SERVERS = []


def stop_all():
    """Kill every server still running (a failed check must not leave them behind)."""
    for s in SERVERS:
        if s.proc.poll() is None:
            s.proc.kill()


class Server:
    def __init__(self, *args):
        self.proc = subprocess.Popen(
            [BIN, "serve", "--port", "0", *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        SERVERS.append(self)
        deadline = time.time() + 120
        self.log = []
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError("server exited: " + "".join(self.log))
            self.log.append(line)
            m = re.search(r"listening on http://(\S+)", line)
            if m:
                self.addr = m.group(1)
                # Keep reading its log (one line per request), so the pipe never fills.
                self.reader = threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True)
                self.reader.start()
                return
        raise RuntimeError("server did not start")

    def url(self, path):
        return f"http://{self.addr}{path}"

    def client(self, key="none"):
        return openai.OpenAI(base_url=self.url("/v1"), api_key=key, max_retries=0)

    def post(self, path, body, headers=None):
        """Raw POST: (status, parsed JSON or text)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url(path), data=data, headers=headers or {}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def metrics(self):
        with urllib.request.urlopen(self.url("/metrics"), timeout=30) as r:
            text = r.read().decode()
        return {l.split()[0]: float(l.split()[1]) for l in text.splitlines() if l and not l.startswith("#")}

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=120)
        self.reader.join(timeout=10)
        return rc


def run_reference(prompt, max_tokens, kv, chat=False):
    args = [BIN, "run", "--prompt", prompt, "--max-tokens", str(max_tokens), "--temperature", "0", "--json"]
    if chat:
        args.append("--chat")
    if kv:
        args += ["--kv-policy", kv["policy"], "--kv-budget", str(kv["budget"])]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return json.loads(out)["text"]


LONG = (
    "The history of the printing press begins in the fifteenth century, when movable type "
    "changed how books were made, how ideas travelled and how people learned to read. "
) * 6
CASES = [
    ("The capital of France is", 12, None),
    ("Once upon a time, in a small village by the sea,", 20, None),
    (LONG + "In short, the printing press", 24, {"policy": "keyformer", "budget": "50%"}),
    (LONG + "Its most important effect was", 24, {"policy": "h2o", "budget": 40}),
]


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok:", what.split("\n")[0][:100])


def completion(client, prompt, max_tokens, kv, stream):
    extra = {"kv_cache": kv} if kv else None
    if stream:
        pieces = client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True, extra_body=extra
        )
        return "".join(c.choices[0].text for c in pieces if c.choices)
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=extra)
    return r.choices[0].text


def chat(client, prompt, max_tokens, kv, stream):
    extra = {"kv_cache": kv} if kv else None
    messages = [{"role": "user", "content": prompt}]
    if stream:
        pieces = client.chat.completions.create(
            model=MODEL_NAME, messages=messages, max_tokens=max_tokens, temperature=0, stream=True, extra_body=extra
        )
        return "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=max_tokens, temperature=0, extra_body=extra
    )
    return r.choices[0].message.content


def main():
    refs = {(p, n, json.dumps(kv)): run_reference(p, n, kv) for p, n, kv in CASES}
    chat_refs = {(p, n, json.dumps(kv)): run_reference(p, n, kv, chat=True) for p, n, kv in CASES[:2]}

    server = Server("--kv-memory", "256M", "--max-batch", "8", "--max-queue", "64")
    client = server.client()
    check([m.id for m in client.models.list().data] == [MODEL_NAME], "GET /v1/models lists the model")

    for p, n, kv in CASES:
        want = refs[(p, n, json.dumps(kv))]
        for stream in (False, True):
            got = completion(client, p, n, kv, stream)
            check(got == want, f"completion stream={stream} kv={kv} equals keyformer run:\n{got!r}\n{want!r}")
    for p, n, kv in CASES[:2]:
        want = chat_refs[(p, n, json.dumps(kv))]
        for stream in (False, True):
            got = chat(client, p, n, kv, stream)
            check(got == want, f"chat stream={stream} equals keyformer run --chat:\n{got!r}\n{want!r}")

    r = client.completions.create(model=MODEL_NAME, prompt=CASES[2][0], max_tokens=8, temperature=0,
                                  extra_body={"kv_cache": CASES[2][2]})
    kv = r.usage.model_extra["kv_cache"]
    check(r.usage.prompt_tokens > 100 and r.usage.completion_tokens == 8, "usage counts the tokens")
    check(kv["policy"] == "keyformer" and kv["evictions"] > 0 and kv["bytes_held_max"] < kv["bytes_full_equivalent"],
          f"usage.kv_cache reports the budget's savings: {kv}")

    # Many at once, mixed: every answer is its own.
    jobs = [(c, s, kind) for c in CASES for s in (False, True) for kind in ("completion",)] * 3
    jobs += [(c, s, "chat") for c in CASES[:2] for s in (False, True)] * 2

    def one(job):
        (p, n, kv), stream, kind = job
        if kind == "chat":
            return chat(client, p, n, kv, stream) == chat_refs[(p, n, json.dumps(kv))]
        return completion(client, p, n, kv, stream) == refs[(p, n, json.dumps(kv))]

    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(one, jobs))
    check(all(results), f"{len(jobs)} concurrent requests each equal their own reference ({results.count(False)} differ)")
    m = server.metrics()
    check(m["keyformer_kv_bytes_in_use"] == 0 and m["keyformer_queue_depth"] == 0, "idle server holds no KV")

    # Bad input: 4xx with an error object, and the server goes on.
    long_prompt = "word " * 9000
    bad = [
        (b"{not json", 400, None),
        (b'{"prompt": 5}', 400, None),
        (json.dumps({"prompt": "x", "max_tokens": "ten"}).encode(), 400, None),
        (json.dumps({"prompt": "x", "kv_cache": {"policy": "lru", "budget": 8}}).encode(), 400, "kv_cache.policy"),
        (json.dumps({"prompt": "x", "kv_cache": {"policy": "keyformer", "budget": 0}}).encode(), 400, "kv_cache.budget"),
        (json.dumps({"prompt": "x", "n": 3}).encode(), 400, "n"),
        (json.dumps({"prompt": long_prompt}).encode(), 400, "prompt"),
        (json.dumps({"prompt": "x", "model": "gpt-4"}).encode(), 404, "model"),
    ]
    for body, status, param in bad:
        code, err = server.post("/v1/completions", body, {"Content-Type": "application/json"})
        check(code == status and "message" in err["error"] and err["error"]["param"] == param,
              f"bad input {body[:40]!r} -> {code} {err}")
    code, err = server.post("/v1/completions", b"x" * (5 << 20))
    check(code == 413 and "error" in err, "an oversized body -> 413")
    try:
        client.completions.create(model=MODEL_NAME, prompt=long_prompt, max_tokens=4)
        check(False, "the client sees the context error")
    except openai.BadRequestError as e:
        check("context" in str(e), "the openai client raises BadRequestError for a too-long prompt")
    check(completion(client, *CASES[0], False) == refs[(CASES[0][0], CASES[0][1], "null")], "still serving after bad input")

    # A client that disconnects frees its sequence.
    before = server.metrics()["keyformer_requests_cancelled_total"]
    host, port = server.addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "Count: 1, 2, 3,", "max_tokens": 3000,
                                                        "temperature": 0, "stream": True}))
    resp = conn.getresponse()
    resp.readline()
    conn.sock.shutdown(2)
    conn.close()
    deadline = time.time() + 30
    while time.time() < deadline and server.metrics()["keyformer_requests_cancelled_total"] == before:
        time.sleep(0.2)
    m = server.metrics()
    check(m["keyformer_requests_cancelled_total"] == before + 1, "a disconnected client's sequence is cancelled")
    check(m["keyformer_kv_bytes_reserved"] == 0, "and its KV reservation is freed")

    # Graceful shutdown: a running request finishes.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        fut = pool.submit(completion, client, CASES[1][0], 200, None, False)
        time.sleep(1.0)
        rc = server.stop()
        check(len(fut.result(timeout=300)) > 0, "a request running at shutdown completes")
    check(rc == 0, f"the server exits cleanly on SIGTERM (rc {rc})")

    # API key.
    keyed = Server("--api-key", "sekret", "--kv-memory", "64M")
    for key, ok in (("none", False), ("sekret", True)):
        try:
            keyed.client(key).models.list()
            check(ok, "right key accepted")
        except openai.AuthenticationError:
            check(not ok, "wrong key -> 401")
    code, err = keyed.post("/v1/completions", {"prompt": "x"})
    check(code == 401 and err["error"]["code"] == "invalid_api_key", "missing key -> 401")
    keyed.stop()

    # Admission by KV memory: the same requests run one at a time with the full cache, several
    # at once with a 50% budget (a token costs 30 layers x 3 KV heads x 2 x 128 bytes here).
    def peak_batch(server, kv, n):
        body = {"prompt": CASES[2][0], "max_tokens": 64, "temperature": 0}
        if kv:
            body["kv_cache"] = kv
        peak, done = 0, []
        with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
            futs = [pool.submit(server.post, "/v1/completions", body) for _ in range(n)]
            while not all(f.done() for f in futs):
                peak = max(peak, server.metrics()["keyformer_batch_size"])
                time.sleep(0.02)
            done = [f.result()[0] for f in futs]
        return peak, done

    tight = Server("--kv-memory", "8M", "--max-batch", "8")
    full_peak, codes = peak_batch(tight, None, 4)
    check(codes == [200] * 4 and full_peak == 1, f"8M of KV runs full-cache requests one at a time (peak {full_peak})")
    kf_peak, codes = peak_batch(tight, {"policy": "keyformer", "budget": "50%"}, 4)
    check(codes == [200] * 4 and kf_peak >= 2, f"the same memory runs keyformer@50% requests together (peak {kf_peak})")
    code, err = tight.post("/v1/completions", {"prompt": CASES[2][0], "max_tokens": 2000})
    check(code == 400 and "kv-memory" in err["error"]["message"], "a request that can never fit -> 400")
    tight.stop()

    # A full queue answers 429; the others are served.
    small = Server("--max-batch", "1", "--max-queue", "1", "--kv-memory", "64M")

    def post_long(_):
        return small.post("/v1/completions", {"prompt": "Count: 1, 2, 3,", "max_tokens": 48, "temperature": 0})[0]

    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        codes = list(pool.map(post_long, range(6)))
    check(429 in codes and 200 in codes and set(codes) <= {200, 429}, f"queue of 1: {codes}")
    small.stop()
    # Random weights: token-id prompts (one token per byte here), every answer to max_tokens.
    rnd = Server("--random-weights", "tiny", "--kv-memory", "64M", "--max-batch", "4")
    text = "Keyformer keeps the key tokens."
    ref = subprocess.run(
        [BIN, "run", "--random-weights", "tiny", "--prompt", text, "--max-tokens", "12", "--kv-policy", "keyformer",
         "--kv-budget", "50%", "--json"], check=True, capture_output=True, text=True).stdout
    ref = json.loads(ref)
    rclient = rnd.client()
    kv = {"policy": "keyformer", "budget": "50%"}
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        outs = list(pool.map(lambda _: rclient.completions.create(
            model="random-tiny", prompt=list(text.encode()), max_tokens=12, temperature=0, extra_body={"kv_cache": kv}),
            range(3)))
    for r in outs:
        check(r.choices[0].text == ref["text"] and r.choices[0].finish_reason == "length"
              and r.usage.prompt_tokens == len(text.encode()) and r.usage.completion_tokens == 12,
              "a token-id prompt on random weights answers as `run --random-weights` does, to max_tokens")
    code, err = rnd.post("/v1/completions", {"prompt": [1, 2, 5000], "max_tokens": 4})
    check(code == 400 and err["error"]["param"] == "prompt", "a token id outside the vocabulary -> 400")
    rnd.stop()
    prefix_reuse_checks()
    reliability_checks()
    print("all server checks passed")


def prefix_reuse_checks():
    """Requests sharing a long system prompt, and a chat's next turn, start from kept prefixes
    (--prefix-cache-memory) and answer exactly as a server without them: the same text and the
    same log-probabilities to the last digit."""
    with open("tests/data/prose.txt") as f:
        system = f.read()[:1600]
    questions = ["Who wrote this?", "What is it about?", "Summarise it in one line.", "Is it long?"]

    def answers(server, kv):
        c = server.client()
        out, history = [], [{"role": "system", "content": system}]
        for q in questions:
            # Two kinds of sharing: the system prompt (a fresh conversation each time) and the
            # conversation so far (the last question continues the third's chat).
            messages = history + [{"role": "user", "content": q}]
            r = c.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=2, extra_body={"kv_cache": kv})
            content = r.choices[0].message.content
            if q.startswith("Summarise"):
                history = messages + [{"role": "assistant", "content": content}]
            out.append((content, [(t.token, t.logprob, [(a.token, a.logprob) for a in t.top_logprobs])
                                  for t in r.choices[0].logprobs.content]))
        return out

    for kv in ({"policy": "full"}, {"policy": "keyformer:chunk=64", "budget": 160}):
        plain = Server("--kv-memory", "256M")
        reference = answers(plain, kv)
        plain.stop()
        cached = Server("--kv-memory", "256M", "--prefix-cache-memory", "64M")
        got = answers(cached, kv)
        m = cached.metrics()
        cached.stop()
        check(got == reference, f"{kv}: answers with kept prefixes equal those without, bit for bit")
        check(m["keyformer_prefix_cache_hits_total"] >= 2 and m["keyformer_prefix_cache_tokens_reused_total"] > 600
              and 0 < m["keyformer_prefix_cache_bytes"] <= 64 << 20,
              f"{kv}: prefix hits {m['keyformer_prefix_cache_hits_total']:.0f}, "
              f"{m['keyformer_prefix_cache_tokens_reused_total']:.0f} tokens reused")
    # The prefixes' memory is set apart: a request that fits --kv-memory but not what the kept
    # prefixes leave of it is refused, naming both.
    tight = Server("--kv-memory", "48M", "--prefix-cache-memory", "40M")
    code, err = tight.post("/v1/chat/completions", {"messages": [{"role": "user", "content": system}],
                                                    "max_tokens": 64})
    tight.stop()
    check(code == 400 and "--prefix-cache-memory" in err["error"]["message"],
          f"a request larger than the memory left beside the prefixes -> 400: {err}")
    # Too little prefix memory for one kept prefix: one clear error at start.
    out = subprocess.run([BIN, "serve", "--port", "0", "--prefix-cache-memory", "1K"], capture_output=True, text=True)
    check(out.returncode == 1 and "less than one kept prefix" in out.stderr, f"tiny --prefix-cache-memory: {out.stderr.strip()}")


def raw_request(server, data):
    """Send bytes as they are (a malformed request) and return the response's status and body."""
    import socket
    host, port = server.addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    head, _, body = out.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def reliability_checks():
    """The defects a new user and the probes found (issue 17), each pinned."""
    server = Server("--kv-memory", "8M", "--max-batch", "8", "--timeout", "4")
    client = server.client()

    # A short chat under a percentage budget keeps its whole prompt (the budget's floor), so
    # it answers as the full cache does.
    hi = [{"role": "user", "content": "Hi"}]
    full = client.chat.completions.create(model=MODEL_NAME, messages=hi, max_tokens=24, temperature=0)
    half = client.chat.completions.create(model=MODEL_NAME, messages=hi, max_tokens=24, temperature=0,
                                          extra_body={"kv_cache": {"policy": "keyformer", "budget": "50%"}})
    check(half.choices[0].message.content == full.choices[0].message.content
          and half.usage.model_extra["kv_cache"]["evictions"] == 0,
          f"a short chat at keyformer@50% answers as the full cache: {half.choices[0].message.content!r}")

    # One request with a corner-case budget among others: each gets its own answer.
    corner = {"prompt": CASES[2][0], "max_tokens": 12, "temperature": 0,
              "kv_cache": {"policy": "h2o", "budget": 4, "recent": 0}}
    normal = {"prompt": CASES[0][0], "max_tokens": CASES[0][1], "temperature": 0}
    want = server.post("/v1/completions", normal)[1]["choices"][0]["text"]
    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        futs = [pool.submit(server.post, "/v1/completions", corner if i % 2 else normal) for i in range(6)]
        res = [f.result() for f in futs]
    check(all(code == 200 for code, _ in res) and all(r["choices"][0]["text"] == want for _, r in res[0::2]),
          f"a budget of 4 with recent 0 runs beside other requests, which answer unchanged: {[c for c, _ in res]}")

    # Sampling options are honoured (the same as `keyformer run` with them), not ignored.
    args = [BIN, "run", "--prompt", CASES[1][0], "-n", "16", "--temp", "0.9", "--top-k", "5", "--min-p", "0.1",
            "--repeat-penalty", "1.3", "--seed", "11", "--json"]
    ref = json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)["text"]
    code, r = server.post("/v1/completions", {"prompt": CASES[1][0], "max_tokens": 16, "temperature": 0.9, "top_k": 5,
                                              "min_p": 0.1, "repeat_penalty": 1.3, "seed": 11, "top_p": 0.95})
    check(code == 200 and r["choices"][0]["text"] == ref, f"top_k, min_p, repeat_penalty and seed as `run`: {r}")

    # Log-probabilities, in each API's shape.
    r = client.completions.create(model=MODEL_NAME, prompt=CASES[0][0], max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    check(len(lp.tokens) == 4 and "".join(lp.tokens) == r.choices[0].text and all(len(t) == 3 for t in lp.top_logprobs)
          and all(v <= 0 for v in lp.token_logprobs)
          and all(abs(max(t.values()) - v) < 1e-5 for t, v in zip(lp.top_logprobs, lp.token_logprobs)),
          "completions logprobs: tokens join to the text, greedy picks the top alternative")
    r = client.chat.completions.create(model=MODEL_NAME, messages=hi, max_tokens=3, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    check(len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content), "chat logprobs with top_logprobs")

    # Fields the engine cannot honour are refused by name.
    for field, value in (("response_format", {"type": "json_object"}), ("frequency_penalty", 0.5),
                         ("logit_bias", {"1": 5}), ("echo", True), ("top_logprobs", 3)):
        code, err = server.post("/v1/completions", {"prompt": "x", field: value})
        check(code == 400 and err["error"]["param"] == field, f"{field} -> 400 naming it: {err}")
    code, err = server.post("/v1/completions", {"prompt": "x", "stream": True, "logprobs": 1})
    check(code == 400 and err["error"]["param"] == "logprobs", "streamed logprobs -> 400")

    # A chat without max_tokens answers (as many tokens as the KV memory and the timeout allow);
    # a request that outlives --timeout returns what it generated, finish_reason "length".
    t0 = time.time()
    r = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Write the numbers from 1 to 1000, separated by commas."}],
                                       temperature=0)
    check(r.choices[0].finish_reason == "length" and r.usage.completion_tokens > 0 and time.time() - t0 < 30,
          f"no max_tokens under 8M of KV: {r.usage.completion_tokens} tokens, then {r.choices[0].finish_reason}: {r.choices[0].message.content[-200:]!r}")

    # Malformed transport: a bad chunk and a body cut short are 400s with an error object; other
    # methods are 405 with one; a multi-megabyte prompt is refused before it is tokenised.
    status, err = raw_request(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                      b"zz\r\nabc\r\n0\r\n\r\n")
    check(status == 400 and "error" in err, f"a bad chunk size -> 400: {err}")
    status, err = raw_request(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"p")
    check(status == 400 and "error" in err, f"a truncated body -> 400: {err}")
    req = urllib.request.Request(server.url("/v1/completions"), method="GET")
    try:
        urllib.request.urlopen(req, timeout=30)
        check(False, "GET /v1/completions is refused")
    except urllib.error.HTTPError as e:
        check(e.code == 405 and "error" in json.loads(e.read()), "GET /v1/completions -> 405 with an error object")
    t0 = time.time()
    code, err = server.post("/v1/completions", {"prompt": "word " * 780000}, {"Content-Type": "application/json"})
    check(code == 400 and err["error"]["code"] == "context_length_exceeded" and time.time() - t0 < 2,
          f"a 3.9 MB prompt is refused in {time.time() - t0:.2f} s")
    m = server.metrics()
    check(m["keyformer_requests_in_flight"] == 0 and m["keyformer_requests_running"] == 0
          and m["keyformer_kv_bytes_reserved"] == 0, "afterwards nothing is in flight, running or reserved")
    server.stop()
    log = "".join(server.log)
    check(len(re.findall(r"^request (cmpl|chatcmpl)-\d+: ", log, re.M)) >= 10 and "request refused: 400" in log,
          "one log line per request")


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        stop_all()
