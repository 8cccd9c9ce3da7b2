"""The Python package against the engine's own outputs: the CLI's generation and evaluation,
perplexity, and its error messages. Run by scripts/test-python.sh (the README's test command
calls it) after `pip install ./python`; the model is the default one, fetched and cached by the
CLI's tests before.
"""

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import keyformer

ROOT = Path(__file__).resolve().parents[2]
CLI = Path(os.environ.get("KEYFORMER_BIN", ROOT / "target" / "release" / "keyformer"))
PROSE = (ROOT / "tests" / "data" / "prose.txt").read_text()
# About 200 tokens: past the 64-token floor of a percentage budget, so policies evict.
PROMPT = " ".join(PROSE.split()[:150])
POLICIES = ["window", "sink", "h2o", "tova", "snapkv", "random", "knorm", "keyformer"]


@pytest.fixture(scope="module")
def engine():
    return keyformer.Engine(keyformer.DEFAULT_MODEL)


def cli(*args):
    if not CLI.exists():
        pytest.skip(f"no CLI at {CLI} (cargo build --release -p keyformer-cli)")
    done = subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("policy", ["full", "keyformer", "h2o", "tova:recent=10%", "keyformer:noise=none:chunk=64", "keyformer-long", "expected:gumbel", "kvzip-global"])
def test_generation_equals_the_cli(engine, policy):
    args = ["run", "-m", keyformer.DEFAULT_MODEL, "-p", PROMPT, "-n", "24", "--seed", "3", "--json",
            "--kv-policy", policy]
    kv = None
    if not policy.startswith("full"):
        args += ["--kv-budget", "50%"]
        kv = keyformer.KvPolicy(policy, budget="50%")
    want = json.loads(cli(*args))
    got = engine.generate(PROMPT, max_tokens=24, seed=3, kv=kv)
    assert got.token_ids == want["token_ids"]
    assert got.text == want["text"]
    assert got.kv_cache == want["kv_cache"]
    assert got.seed == want["seed"] == 3


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_runs_and_evicts(engine, policy):
    kv = keyformer.KvPolicy(policy, budget="50%", seed=1)
    out = engine.generate(PROMPT, max_tokens=8, kv=kv)
    n = out.prompt_tokens
    assert n > 128
    report = out.kv_cache
    assert report["policy"] == policy
    assert abs(report["budget_tokens"] - n / 2) <= 1
    assert report["evictions"] > 0
    assert report["bytes_held_max"] < report["bytes_full_equivalent"]
    assert out.generated_tokens == len(out.token_ids) > 0


def test_policy_settings_are_the_cli_parser(engine):
    kv = keyformer.KvPolicy("keyformer", budget=96, recent="10%", tau=(1, 3), noise="gaussian", sinks=4, chunk=64)
    assert kv.spec == "keyformer:budget=96:recent=10%:tau=1.0-3.0:noise=gaussian:sinks=4:chunk=64"
    s = kv.settings
    assert (s["kind"], s["budget"], s["recent"], s["tau"], s["noise"], s["sinks"], s["prefill_chunk"]) == (
        "keyformer", "96", "10%", [1.0, 3.0], "gaussian", 4, 64)
    # A whole spec string is the same policy.
    assert keyformer.KvPolicy("keyformer:budget=96:recent=10%:tau=1-3:noise=gaussian:sinks=4:chunk=64").settings == s
    assert engine.generate(PROMPT, max_tokens=4, kv=kv).kv_cache["budget_tokens"] == 96


def test_streaming_joins_to_the_text(engine):
    kv = keyformer.KvPolicy("keyformer", budget="50%")
    whole = engine.generate(PROMPT, max_tokens=40, seed=5, kv=kv, stop=["\n\n\n"])
    stream = engine.stream(PROMPT, max_tokens=40, seed=5, kv=kv, stop=["\n\n\n"])
    pieces = list(stream)
    assert len(pieces) > 1
    assert "".join(pieces) == whole.text == stream.result.text
    assert stream.result.token_ids == whole.token_ids


def test_a_closed_stream_stops_its_generation(engine):
    with engine.stream(PROMPT, max_tokens=400, temperature=0.8, seed=1) as stream:
        first = [next(stream) for _ in range(3)]
        stream.close()
        rest = list(stream)
    assert len(first) == 3
    assert stream.result.stop_reason == "cancelled"
    assert stream.result.generated_tokens < 400
    assert "".join(first + rest) == stream.result.text


def test_stop_strings_and_sampling_seeds(engine):
    a = engine.generate(PROMPT, max_tokens=32, temperature=0.9, seed=11)
    b = engine.generate(PROMPT, max_tokens=32, temperature=0.9, seed=11)
    assert a.token_ids == b.token_ids
    if len(a.text) > 4:
        stop = a.text[2:4]
        c = engine.generate(PROMPT, max_tokens=32, temperature=0.9, seed=11, stop=stop)
        assert c.stop_reason == "stop_string"
        assert stop not in c.text and a.text.startswith(c.text)


@pytest.mark.parametrize("kv", [None, "h2o:budget=50%", "keyformer:budget=40%", "window:budget=32"])
def test_logits_give_the_engines_perplexity(engine, kv):
    ctx = 128
    tokens = engine.tokenize(PROSE)[:ctx]
    logits = engine.logits(tokens, kv=kv)
    assert logits.shape == (ctx, engine.vocab_size) and logits.dtype == np.float32
    rows = logits[:-1].astype(np.float64)
    top = rows.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(rows - top).sum(axis=1))
    nll = float(np.mean(log_z - rows[np.arange(ctx - 1), tokens[1:]]))
    report = engine.perplexity(PROSE, ctx=ctx, kv=kv, max_windows=1)
    assert report["tokens_scored"] == ctx - 1
    assert nll == pytest.approx(report["mean_nll"], rel=1e-6)


def test_logits_over_a_prompt_are_the_full_caches(engine):
    tokens = engine.tokenize(PROSE)[:160]
    full = engine.logits(tokens)
    compressed = engine.logits(tokens, kv="keyformer:budget=50%", prompt_tokens=128)
    # The prompt's rows come before its compression: the full cache's, bit for bit.
    assert np.array_equal(full[:128], compressed[:128])
    # After it, the compressed cache answers differently.
    assert not np.array_equal(full[128:], compressed[128:])
    assert np.isfinite(compressed).all()


def test_chat_uses_the_models_template(engine):
    messages = [{"role": "system", "content": "You answer in one word."},
                {"role": "user", "content": "What colour is the sky?"}]
    prompt = engine.chat_prompt(messages)
    assert "What colour is the sky?" in prompt and "You answer in one word." in prompt
    assert engine.chat(messages, max_tokens=8, seed=0).text == engine.generate(prompt, max_tokens=8, seed=0).text


def test_tokenize_detokenize(engine):
    text = "Key tokens, kept: 42 of them."
    ids = engine.tokenize(text)
    assert ids == json.loads(cli("tokenize", "-m", keyformer.DEFAULT_MODEL, "-p", text, "--json"))["token_ids"]
    assert engine.detokenize(ids).endswith(text)


def test_generation_releases_the_gil(engine):
    started, done = threading.Event(), threading.Event()

    def generate():
        started.set()
        engine.generate(PROMPT, max_tokens=96)
        done.set()

    threading.Thread(target=generate, daemon=True).start()
    started.wait()
    start = last = time.perf_counter()
    longest_pause = 0.0
    while not done.is_set():
        now = time.perf_counter()
        longest_pause, last = max(longest_pause, now - last), now
    elapsed = time.perf_counter() - start
    # Were the GIL held, this loop would stand still for the whole native call.
    assert elapsed > 0.1, elapsed
    assert longest_pause < elapsed / 3, (longest_pause, elapsed)


def test_eval_equals_the_cli(engine, tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"id": "prose", "context": PROSE}) + "\n")
    args = dict(tasks=["fidelity", "ppl"], policies=["h2o", "keyformer:noise=none"], budgets=["50%"], seeds=[0],
                prompt_tokens=96, continuation_tokens=16, ppl_ctx=128, limit=1)
    got = keyformer.eval(docs, tmp_path / "py", **args)
    cli("eval", "-m", keyformer.DEFAULT_MODEL, "--data", str(docs), "--out", str(tmp_path / "cli"),
        "--tasks", "fidelity,ppl", "--policies", "h2o,keyformer:noise=none", "--budgets", "50%", "--seeds", "0",
        "--prompt-tokens", "96", "--continuation-tokens", "16", "--ppl-ctx", "128", "--limit", "1")
    want = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert got["summary"] == want
    assert {(r["task"], r["policy"]) for r in want} >= {("fidelity", "h2o"), ("ppl", "keyformer:noise=none")}
    if "frame" in got:
        assert set(got["frame"]["policy"]) == {"h2o", "keyformer:noise=none"}


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda e: keyformer.KvPolicy("lru", budget="50%"), "lru"),
        (lambda e: keyformer.KvPolicy("keyformer", budget=0), "at least 1 token"),
        (lambda e: keyformer.KvPolicy("keyformer"), "needs a --kv-budget"),
        (lambda e: keyformer.KvPolicy("keyformer", budget="50%", colour="red"), "unknown option 'colour=red'"),
        (lambda e: keyformer.KvPolicy("h2o", budget=32, recent=64), "recent"),
        (lambda e: keyformer.KvPolicy("keyformer", budget="50%", tau=3), "tau is (init, end)"),
        (lambda e: e.generate(PROMPT, max_tokens=0), "max_tokens must be at least 1"),
        (lambda e: e.generate(PROMPT, kv="full:budget=50%:bogus"), "unknown option"),
        (lambda e: e.generate("", max_tokens=4), "empty"),
        (lambda e: e.generate([e.vocab_size + 5], max_tokens=4), "outside the vocabulary"),
        (lambda e: e.generate(" word" * 9000, max_tokens=4), "context"),
        (lambda e: e.detokenize([10**9]), "outside the vocabulary"),
        (lambda e: e.chat([{"text": "hi"}]), "'role' and 'content'"),
        (lambda e: e.perplexity(PROSE, ctx=1), "at least 2"),
        (lambda e: e.logits([]), "empty"),
        (lambda e: e.logits([1, 2, 3], prompt_tokens=9), "1 to 3 tokens"),
        (lambda e: keyformer.Engine("no/such/model.gguf"), "does not exist"),
        (lambda e: keyformer.Engine(device="tpu"), "cpu or cuda"),
        (lambda e: keyformer.Engine(kv_type="f8"), "f8"),
        (lambda e: keyformer.Engine(threads=0), "at least 1"),
        (lambda e: keyformer.Engine(gpu_weights="q4"), "gpu_weights is f16 or native"),
        (lambda e: keyformer.KvPolicy("keyformer-short", budget="50%"), "keyformer-long"),
        (lambda e: keyformer.Engine(threads=999), "threads are set once per process"),
        (lambda e: keyformer.eval("no-such.jsonl", "out", tasks=["ppl"], colour=1), "unknown eval options"),
        (lambda e: keyformer.eval("x.jsonl", "out", tasks=["juggling"]), "juggling"),
        (lambda e: keyformer.eval("x.jsonl", "out", policies=["h2o:budget=10"]), "budget="),
    ],
)
def test_bad_arguments_raise_value_error(engine, call, message):
    with pytest.raises(ValueError) as err:
        call(engine)
    assert message in str(err.value)


def test_cuda_is_refused_clearly_without_it():
    if keyformer.has_cuda():
        pytest.skip("built with CUDA")
    with pytest.raises(ValueError, match="built without the CUDA backend"):
        keyformer.Engine(device="cuda")
