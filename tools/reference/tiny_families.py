#!/usr/bin/env python3
"""Tiny random-weight models of several architectures, as GGUF files with transformers goldens.

For each family this builds a small model with transformers' own config/model classes
(torch.manual_seed fixed, float32, eager attention), makes every parameter non-trivial (a
tensor that init left constant, e.g. norm weights at 1 or biases at 0, becomes
`mean + 0.1 * randn`, so a missing op shows), saves the HF folder with a tiny byte-level BPE
tokenizer, converts it with llama.cpp's own converter (`--outtype f32`) and writes

    tests/golden/families/hf/<family>/    the HF folder itself (config.json, model.safetensors,
        tokenizer.json, tokenizer_config.json, generation_config.json, chat_template.jinja)
    tests/golden/families/<family>.gguf   (< ~1 MB; not for gptj, which the converter lacks)
    tests/golden/families/<family>.json   {"family", "architecture" (GGUF general.architecture),
        "transformers_version", "torch_version", "config" (the HF config dict),
        "checks" (how much each exercised feature moves the logits: max |delta logit| when the
                  feature is switched off in transformers, with the same weights),
        "cases": [{"ids", "positions", "logits" (one vocab row per position in `positions`,
                   6 significant digits), "greedy32" (32 greedy ids after the prompt,
                   transformers generate, do_sample=False, no EOS stop)}]}

plus `hf/qwen2-bf16/` and `qwen2-bf16.json` (the same weights in bf16; see build_bf16), and,
with `verify`, runs llama.cpp (llama-cpp-python over the build of
scripts/build-llamacpp.sh) over each GGUF to compare its logits and greedy ids with the goldens.

Usage (versions this was made with: torch 2.15.0, transformers 5.25.0, tokenizers 0.23.3,
llama.cpp / gguf-py from the llama-cpp-python 0.3.36 sdist):
    LLAMA=$(scripts/build-llamacpp.sh)
    python3 tools/reference/tiny_families.py build [FAMILY ...]         # torch + transformers
    LLAMA_CPP_LIB_PATH=$LLAMA/build/bin PYTHONPATH=$LLAMA/llama_cpp_python-0.3.36 \\
        python3 tools/reference/tiny_families.py verify [FAMILY ...]
    python3 tools/reference/tiny_families.py inspect [FAMILY ...]       # GGUF keys + tensors

Tricks (all in `convert`):
- The converter (vendor/llama.cpp/convert_hf_to_gguf.py + its `conversion` package) is imported
  as a module, with the sdist's own gguf-py first on sys.path: the gguf 0.19.0 wheel on the
  registry is older than the gguf-py in the sdist (same version string, ~1700 fewer lines in
  constants.py) and lacks keys the converter writes.
- The tokenizer is a byte-level BPE trained with `tokenizers` on tests/data/prose.txt (GPT-2
  pre-tokenizer: ByteLevel with its regex), ids 0..255 the 256 byte symbols, then merges, then
  the special tokens at the top of the vocab. Its pre-tokenizer hash is unknown to the
  converter, so `get_vocab_base_pre` is patched to return "gpt-2" (that is what it is), and
  every family's `set_vocab` is patched to `_set_vocab_gpt2` (gemma*, phi3 and llama would
  otherwise look for a SentencePiece tokenizer.model).
"""
import argparse
import copy
import json
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests/golden/families"
CACHE = Path(os.environ.get("KEYFORMER_CACHE", Path.home() / ".cache/keyformer"))
LLAMA_VERSION = "0.3.36"
LLAMA_SRC = CACHE / f"llama.cpp/{LLAMA_VERSION}/llama_cpp_python-{LLAMA_VERSION}/vendor/llama.cpp"

VOCAB = 512
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]  # ids 509, 510, 511
IM_START, IM_END, EOT = VOCAB - 3, VOCAB - 2, VOCAB - 1
SEED = 1234
PROMPT_LENS = [7, 24, 40]
N_GREEDY = 32
# A prompt is kept only if every greedy step's top-1 beats the top-2 by this much (prompts are
# redrawn from the same seeded generator otherwise), so the greedy goldens survive f32
# reordering and llama.cpp's fp16 GELU table (~3e-3 on the logits).
MIN_GAP = 0.01

# Shared shape: hidden 64, head_dim 16, 4 query heads over 2 KV heads.
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
            bos_token_id=EOT, eos_token_id=EOT, pad_token_id=EOT, initializer_range=0.2)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
               "rope_theta": 10000.0}


def phi3_longrope_params():
    # 8 = head_dim / 2 factors each; original context 4 (< every prompt) so transformers (long
    # factors when the sequence is longer than that) and llama.cpp (long factors when n_ctx >
    # the original context) both use the long ones throughout; with max_position_embeddings 256
    # the attention factor is sqrt(1 + ln(256/4) / ln 4) = 2.
    return {"rope_type": "longrope", "rope_theta": 10000.0,
            "short_factor": [1.0, 1.1, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0],
            "long_factor": [1.0, 1.3, 1.7, 2.2, 3.0, 4.5, 6.0, 8.0],
            "original_max_position_embeddings": 4}


# family -> (config class, model class, config kwargs, checks)
# checks: (label, function(config dict) -> modified config dict or None for a weight edit)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(BASE, num_hidden_layers=2, rope_parameters=dict(LLAMA3_ROPE),
                   tie_word_embeddings=False, rms_norm_eps=1e-5),
              [("llama3 rope scaling off", lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))]),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                # sliding_window larger than any test sequence: the llama GGUF that the converter
                # writes has no sliding-window key, so a smaller one would not round-trip.
                dict(BASE, num_hidden_layers=2, sliding_window=4096, rope_theta=1000000.0,
                     tie_word_embeddings=False, rms_norm_eps=1e-5),
                []),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(BASE, num_hidden_layers=2, intermediate_size=160, rope_theta=1000000.0,
                   tie_word_embeddings=True, rms_norm_eps=1e-6, use_sliding_window=False),
              [("q/k/v biases zeroed", "zero_bias")]),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(BASE, num_hidden_layers=2, intermediate_size=160, rope_theta=1000000.0,
                   tie_word_embeddings=True, rms_norm_eps=1e-6, use_sliding_window=False),
              [("q/k norms set to 1", "unit_qk_norm")]),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               # query_pre_attn_scalar = head_dim: GGUF has no key for it, llama.cpp uses
               # head_dim (or n_embd/n_head for the 46-layer 27B), see the report.
               dict(BASE, num_hidden_layers=4, sliding_window=8, attn_logit_softcapping=5.0,
                    final_logit_softcapping=3.0, query_pre_attn_scalar=16, rope_theta=10000.0,
                    hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, rms_norm_eps=1e-6),
               [("attn softcap off", lambda c: c.update(attn_logit_softcapping=None)),
                ("final softcap off", lambda c: c.update(final_logit_softcapping=None)),
                ("sliding window off", lambda c: c.update(sliding_window=4096))]),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(BASE, num_hidden_layers=6, num_key_value_heads=1, sliding_window=8,
                    query_pre_attn_scalar=16, hidden_activation="gelu_pytorch_tanh",
                    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                     "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
                    tie_word_embeddings=True, rms_norm_eps=1e-6),
               [("sliding window off", lambda c: c.update(sliding_window=4096)),
                ("local rope base = global", lambda c: c["rope_parameters"]["sliding_attention"].update(rope_theta=1000000.0)),
                ("q/k norms set to 1 (weight 0)", "unit_qk_norm_gemma")]),
    "phi3": ("Phi3Config", "Phi3ForCausalLM",
             dict(BASE, num_hidden_layers=2, rope_theta=10000.0, tie_word_embeddings=False,
                  original_max_position_embeddings=256, rms_norm_eps=1e-5, sliding_window=None),
             []),
    "phi3-longrope": ("Phi3Config", "Phi3ForCausalLM",
                      # the top-level original_max_position_embeddings wins over the one in
                      # rope_parameters in transformers 5 (default 4096), so it is set in both
                      dict(BASE, num_hidden_layers=2, rope_parameters=phi3_longrope_params(),
                           original_max_position_embeddings=4,
                           tie_word_embeddings=False, rms_norm_eps=1e-5, sliding_window=None),
                      [("longrope off", lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))]),
    # lower priority families
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_attention_heads=4,
                      num_hidden_layers=2, rotary_pct=0.25, use_parallel_residual=True,
                      max_position_embeddings=256, bos_token_id=EOT, eos_token_id=EOT,
                      tie_word_embeddings=False, initializer_range=0.2, layer_norm_eps=1e-5),
                 [("parallel residual off", lambda c: c.update(use_parallel_residual=False))]),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             # n_inner left at 4 * n_embd: the converter writes feed_forward_length = 4 * n_embd
             dict(vocab_size=VOCAB, n_embd=64, n_head=4, n_layer=2, n_positions=256,
                  bos_token_id=EOT, eos_token_id=EOT, initializer_range=0.2,
                  tie_word_embeddings=True, layer_norm_epsilon=1e-5),
             []),
    # GPT-J: llama.cpp's converter does not write it, so it exists only as an HF folder.
    "gptj": ("GPTJConfig", "GPTJForCausalLM",
             # rotary on half of each 16-wide head (the 6B model: 64 of 256), interleaved pairs
             dict(vocab_size=VOCAB, n_embd=64, n_head=4, n_layer=2, rotary_dim=8, n_positions=256,
                  bos_token_id=EOT, eos_token_id=EOT, initializer_range=0.2,
                  tie_word_embeddings=False, layer_norm_epsilon=1e-5),
             [("output head bias zeroed", "zero_lm_head_bias")]),
    "mpt": ("MptConfig", "MptForCausalLM",
            # expansion_ratio 4 and layer_norm_epsilon 1e-5: the converter writes those as constants
            dict(vocab_size=VOCAB, d_model=64, n_heads=4, n_layers=2, expansion_ratio=4,
                 max_seq_len=256, initializer_range=0.2, layer_norm_epsilon=1e-5,
                 bos_token_id=EOT, eos_token_id=EOT,
                 attn_config={"alibi": True, "alibi_bias_max": 8}),
            []),
    # MPT with clip_qkv (its 7B models have none; DBRX-style checkpoints do): Q, K and V clamped.
    "mpt-clip": ("MptConfig", "MptForCausalLM",
                 dict(vocab_size=VOCAB, d_model=64, n_heads=4, n_layers=2, expansion_ratio=4,
                      max_seq_len=256, initializer_range=0.2, layer_norm_epsilon=1e-5,
                      bos_token_id=EOT, eos_token_id=EOT,
                      attn_config={"alibi": True, "alibi_bias_max": 8, "clip_qkv": 0.5}),
                 [("clip_qkv off", lambda c: c["attn_config"].update(clip_qkv=None))]),
}


# Keys added to the converter's hparams (Trick 4), which reads older spellings that transformers 5
# no longer keeps (rotary_pct, n_ctx) or a remote-code class name (MPT's).
HPARAMS_EXTRA = {
    "gpt_neox": {"rotary_pct": 0.25},
    "gpt2": {"n_ctx": 256},
    "mpt": {"architectures": ["MPTForCausalLM"]},
    "mpt-clip": {"architectures": ["MPTForCausalLM"]},
}


# ---------------------------------------------------------------------------------------------
# tokenizer

def build_tokenizer(folder: Path) -> None:
    """A byte-level BPE of exactly VOCAB ids, saved as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - len(SPECIALS), min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    text = (ROOT / "tests/data/prose.txt").read_text()
    tok.train_from_iterator([text] * 4, trainer=trainer)
    n = tok.get_vocab_size()
    assert n == VOCAB - len(SPECIALS), f"trained vocab {n}"
    # byte symbols first: the trainer puts the initial alphabet first, sorted by char
    vocab = tok.get_vocab()
    assert max(vocab[c] for c in pre_tokenizers.ByteLevel.alphabet()) == 255
    tok.add_special_tokens(SPECIALS)
    assert tok.get_vocab_size() == VOCAB and tok.token_to_id("<|endoftext|>") == EOT
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   add_bos_token=False, add_eos_token=False)
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(folder)
    # explicit add_bos/add_eos (transformers 5 leaves them out), so the GGUF gets
    # tokenizer.ggml.add_bos_token = false like Qwen's
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(add_bos_token=False, add_eos_token=False)
    cfg_path.write_text(json.dumps(cfg, indent=2))


# ---------------------------------------------------------------------------------------------
# model

def make_config(family):
    import transformers
    cls_name, _, kw, _ = FAMILIES[family]
    return getattr(transformers, cls_name)(**copy.deepcopy(kw))


def instantiate(family, config):
    import torch
    import transformers
    model_cls = getattr(transformers, FAMILIES[family][1])
    model = model_cls._from_config(config, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def randomise(model, gen):
    """Every parameter that init left constant (norm weights, biases) becomes mean + 0.1 randn."""
    import torch
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() == 1 or float(p.detach().float().std()) == 0.0:
                mean = float(p.detach().float().mean())
                p.copy_(mean + 0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def draw_prompt(gen, n):
    import torch
    # ids from the byte/merge range (0..VOCAB-4): no special token inside the prompts
    return torch.randint(0, VOCAB - len(SPECIALS), (n,), generator=gen).tolist()


def forward_logits(model, ids):
    import torch
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double()


def greedy(model, ids, n):
    import torch
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = EOT
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=EOT, temperature=None, top_p=None, top_k=None)
    new = out[0, len(ids):].tolist()
    assert len(new) == n, len(new)
    return new


def variant_logits(family, model, config_dict, action, ids):
    """Logits of `ids` with one feature switched off (a config edit or a weight edit)."""
    import torch
    import transformers
    if callable(action):
        d = copy.deepcopy(config_dict)
        action(d)
        cfg = getattr(transformers, FAMILIES[family][0]).from_dict(d)
        m2 = instantiate(family, cfg)
        m2.load_state_dict(model.state_dict())
    else:
        m2 = copy.deepcopy(model)
        with torch.no_grad():
            for name, p in m2.named_parameters():
                if action == "zero_bias" and name.endswith("_proj.bias"):
                    p.zero_()
                elif action == "unit_qk_norm" and ("q_norm" in name or "k_norm" in name):
                    p.fill_(1.0)
                elif action == "unit_qk_norm_gemma" and ("q_norm" in name or "k_norm" in name):
                    p.fill_(0.0)
                elif action == "zero_lm_head_bias" and name == "lm_head.bias":
                    p.zero_()
    return forward_logits(m2.eval(), ids)


def sig6(x):
    return float(f"{x:.6g}")


# Families llama.cpp's converter does not write: HF folder only.
NO_GGUF = {"gptj"}
# Families also saved as a bf16 folder, with transformers' bf16 logits as its golden.
BF16 = {"qwen2"}
# What a folder keeps of save_pretrained's output (the rest is not read by anyone).
HF_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja"}


def save_folder(model, hf: Path) -> None:
    """An HF folder as a user holds it: weights, config, tokenizer, chat template."""
    import shutil
    if hf.exists():
        shutil.rmtree(hf)
    hf.mkdir(parents=True)
    model.save_pretrained(hf, safe_serialization=True)
    build_tokenizer(hf)
    for f in hf.iterdir():
        if f.name not in HF_FILES:
            f.unlink()


def build(family):
    import torch
    import transformers

    config = make_config(family)
    torch.manual_seed(SEED)
    model = instantiate(family, config)
    gen = torch.Generator().manual_seed(SEED + 1)
    randomise(model, gen)

    hf = OUT / "hf" / family
    save_folder(model, hf)
    # reload from disk, as a user would, and check the round trip
    model = getattr(transformers, FAMILIES[family][1]).from_pretrained(
        hf, attn_implementation="eager", dtype=torch.float32).eval()
    gguf_path = OUT / f"{family}.gguf"
    if family not in NO_GGUF:
        convert(hf, gguf_path, HPARAMS_EXTRA.get(family, {}))
    if family in BF16:
        build_bf16(family, model)

    config_dict = model.config.to_dict()
    config_dict.pop("_name_or_path", None)  # the temp folder: keeps the JSON reproducible
    cases, checks = [], []
    gen = torch.Generator().manual_seed(SEED + 2)
    for n in PROMPT_LENS:
        for attempt in range(200):
            ids = draw_prompt(gen, n)
            g = greedy(model, ids, N_GREEDY)
            # consistency: a full forward over prompt + continuation picks the same ids
            full = forward_logits(model, ids + g)
            assert full[len(ids) - 1:-1].argmax(-1).tolist() == g, "greedy differs from full forward"
            top2 = torch.topk(full[len(ids) - 1:-1], 2, dim=-1).values
            gap = float((top2[:, 0] - top2[:, 1]).min())
            if gap >= MIN_GAP:
                break
        else:
            raise SystemExit(f"{family}: no prompt of length {n} with a greedy gap >= {MIN_GAP}")
        logits = forward_logits(model, ids)
        cases.append({"ids": ids, "positions": list(range(len(ids))),
                      "logits": [[sig6(v) for v in row] for row in logits.tolist()],
                      "greedy32": g, "greedy_min_top2_gap": sig6(gap), "draws": attempt + 1})
    ids = cases[-1]["ids"]
    base = forward_logits(model, ids)
    for label, action in FAMILIES[family][3]:
        delta = float((variant_logits(family, model, config_dict, action, ids) - base).abs().max())
        checks.append({"feature": label, "max_abs_delta_logit": sig6(delta)})
    doc = {"family": family,
           "architecture": "gptj" if family in NO_GGUF else gguf_arch(gguf_path),
           "gguf": family not in NO_GGUF,
           "transformers_version": transformers.__version__, "torch_version": torch.__version__.split("+")[0],
           "hf_model_class": FAMILIES[family][1], "config": config_dict,
           "special_tokens": {"<|im_start|>": IM_START, "<|im_end|>": IM_END, "<|endoftext|>": EOT},
           "max_abs_logit": sig6(max(max(abs(v) for row in c["logits"] for v in row) for c in cases)),
           "checks": checks, "cases": cases}
    path = OUT / f"{family}.json"
    path.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    if path.stat().st_size > 1_000_000:  # keep the last 8 positions only
        for c in doc["cases"]:
            c["positions"] = c["positions"][-8:]
            c["logits"] = c["logits"][-8:]
        path.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    size = gguf_path.stat().st_size if family not in NO_GGUF else 0
    print(f"{family}: {size} B gguf, {path.stat().st_size} B json, "
          f"arch {doc['architecture']}, checks {checks}")


def build_bf16(family, model):
    """`hf/<family>-bf16/`: the same weights rounded to bf16, with two goldens: transformers in
    f32 over the rounded weights (`logits`, what an engine computing in f32 must give) and
    transformers in bf16 (`logits_bf16`, differing from it by bf16's rounding of activations)."""
    import torch
    import transformers
    name = f"{family}-bf16"
    hf = OUT / "hf" / name
    save_folder(copy.deepcopy(model).to(torch.bfloat16), hf)  # .to() would change `model` itself
    cls = getattr(transformers, FAMILIES[family][1])
    m32 = cls.from_pretrained(hf, attn_implementation="eager", dtype=torch.float32).eval()
    m16 = cls.from_pretrained(hf, attn_implementation="eager", dtype=torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(SEED + 3)
    cases = []
    for n in PROMPT_LENS:
        ids = draw_prompt(gen, n)
        cases.append({"ids": ids, "positions": list(range(n)),
                      "logits": [[sig6(v) for v in row] for row in forward_logits(m32, ids).tolist()],
                      "logits_bf16": [[sig6(v) for v in row] for row in forward_logits(m16, ids).tolist()]})
    for c in cases:  # keep the file small: the last 4 positions
        for k in ("positions", "logits", "logits_bf16"):
            c[k] = c[k][-4:]
    doc = {"family": name, "transformers_version": transformers.__version__,
           "torch_version": torch.__version__.split("+")[0], "cases": cases}
    (OUT / f"{name}.json").write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    print(f"{name}: bf16 folder and goldens")


# ---------------------------------------------------------------------------------------------
# conversion

def import_converter():
    for p in [str(LLAMA_SRC), str(LLAMA_SRC / "gguf-py")]:
        if p not in sys.path:
            sys.path.insert(0, p)
    if "gguf" in sys.modules:
        assert str(LLAMA_SRC) in sys.modules["gguf"].__file__, "gguf imported before the sdist's gguf-py"
    import convert_hf_to_gguf  # noqa: F401
    import conversion
    return convert_hf_to_gguf, conversion


def convert(hf: Path, out: Path, extra_hparams: dict) -> None:
    cv, conversion = import_converter()
    from conversion.base import ModelBase, TextModel

    # Trick 4: the converter reads config.json through AutoConfig(...).to_dict(), which drops
    # legacy keys; add what it still expects.
    real_load = ModelBase.load_hparams  # the plain function behind the staticmethod
    if not getattr(real_load, "patched", False):
        def load_hparams(dir_model, is_mistral_format):
            return {**real_load(dir_model, is_mistral_format), **load_hparams.extra}
        load_hparams.patched = True
        ModelBase.load_hparams = staticmethod(load_hparams)
    ModelBase.load_hparams.extra = extra_hparams

    # Trick 1: our tokenizer's pre-tokenizer hash is not in the converter's table; it is GPT-2's.
    TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    real_get_model_class = conversion.get_model_class

    def get_model_class(name, mmproj=False):
        cls = real_get_model_class(name, mmproj=mmproj)
        # Trick 2: every family takes the byte-level BPE vocabulary path.
        return type(cls.__name__, (cls,), {"set_vocab": lambda self: self._set_vocab_gpt2(),
                                             "model_arch": cls.model_arch})

    cv.get_model_class = get_model_class
    argv = sys.argv
    # Trick 3: a neutral general.name: llama.cpp keys tokenizer quirks on it (a name containing
    # "phi3" makes it look up "</s>" and "<s>", absent from our vocab, and refuse the file).
    sys.argv = ["convert_hf_to_gguf.py", str(hf), "--outtype", "f32", "--outfile", str(out),
                "--model-name", "keyformer tiny random"]
    try:
        cv.main()
    finally:
        sys.argv = argv


def gguf_arch(path):
    import_converter()
    from gguf import GGUFReader
    return GGUFReader(str(path)).fields["general.architecture"].contents()


def inspect(family):
    import_converter()
    from gguf import GGUFReader
    r = GGUFReader(str(OUT / f"{family}.gguf"))
    print(f"== {family}")
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        if k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
            v = f.contents()
            print(f"  {k} = [{len(v)} items] {v[:3]}..{v[-3:]}")
        elif k == "tokenizer.chat_template":
            print(f"  {k} = <{len(f.contents())} chars>")
        else:
            print(f"  {k} = {f.contents()}")
    for t in r.tensors:
        print(f"  T {t.name} {t.tensor_type.name} {list(map(int, t.shape))}")


# ---------------------------------------------------------------------------------------------
# llama.cpp cross-check

def verify(family):
    if family in NO_GGUF:
        return None
    import numpy as np
    from llama_cpp import Llama
    doc = json.loads((OUT / f"{family}.json").read_text())
    llm = Llama(model_path=str(OUT / f"{family}.gguf"), n_ctx=256, n_batch=256, n_threads=2,
                logits_all=True, verbose=False, seed=0, type_k=0, type_v=0)
    worst_all, worst_last, greedy_ok, scale = 0.0, 0.0, [], doc["max_abs_logit"]
    for c in doc["cases"]:
        ids = c["ids"]
        llm.reset()
        llm.eval(ids)
        ours = np.array([llm.scores[p] for p in c["positions"]], dtype=np.float64)
        ref = np.array(c["logits"], dtype=np.float64)
        worst_all = max(worst_all, float(np.abs(ours - ref).max()))
        worst_last = max(worst_last, float(np.abs(ours[-1] - ref[-1]).max()))
        # greedy with llama.cpp's KV cache
        out = []
        tok = int(np.argmax(llm.scores[len(ids) - 1]))
        for _ in range(N_GREEDY):
            out.append(tok)
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        greedy_ok.append(sum(a == b for a, b in zip(out, c["greedy32"])))
    res = {"family": family, "max_abs_logit": scale, "max_abs_diff_last": worst_last,
           "rel_last": worst_last / scale, "max_abs_diff_all": worst_all, "rel_all": worst_all / scale,
           "greedy_matches_of_32": greedy_ok}
    print(json.dumps(res))
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["build", "verify", "inspect"])
    ap.add_argument("families", nargs="*")
    a = ap.parse_args()
    fams = a.families or list(FAMILIES)
    for f in fams:
        if a.mode == "build":
            import_converter()  # the sdist's gguf-py before anything imports the wheel's
            build(f)
        elif a.mode == "verify":
            verify(f)
        else:
            inspect(f)


if __name__ == "__main__":
    main()
