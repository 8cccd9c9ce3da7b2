"""Type stubs of the native module (the Rust engine). Use the `keyformer` package's API."""

from typing import Any, Dict, List, Optional, Tuple

__version__: str
DEFAULT_MODEL: str

def parse_policy(spec: str, seed: int = 0) -> Dict[str, Any]: ...
def has_cuda() -> bool: ...
def model_aliases() -> List[str]: ...
def run_eval(
    model: str,
    data: str,
    tasks: List[str],
    policies: List[str],
    budgets: List[str],
    seeds: List[int],
    out: str,
    options: Dict[str, Any],
) -> List[Dict[str, Any]]: ...

class Stream:
    def __iter__(self) -> "Stream": ...
    def __next__(self) -> str: ...
    def close(self) -> None: ...
    def result(self) -> Optional[Dict[str, Any]]: ...

class Engine:
    def __init__(
        self,
        model: str,
        device: str = "cpu",
        threads: Optional[int] = None,
        kv_type: str = "f16",
        ctx: int = 0,
        random_weights: Optional[str] = None,
        prefill_activations: str = "q8",
    ) -> None: ...
    @property
    def name(self) -> str: ...
    @property
    def context_length(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def architecture(self) -> str: ...
    @property
    def device(self) -> str: ...
    def tokenize(self, text: str) -> List[int]: ...
    def detokenize(self, ids: List[int]) -> str: ...
    def chat_prompt(self, messages: List[Tuple[str, str]]) -> str: ...
    def generate(
        self,
        prompt: List[int],
        max_tokens: int,
        temperature: float,
        top_k: int,
        top_p: float,
        min_p: float,
        repeat_penalty: float,
        repeat_last_n: int,
        stop: List[str],
        seed: Optional[int],
        kv: Optional[str],
        kv_seed: Optional[int],
    ) -> Dict[str, Any]: ...
    def stream(
        self,
        prompt: List[int],
        max_tokens: int,
        temperature: float,
        top_k: int,
        top_p: float,
        min_p: float,
        repeat_penalty: float,
        repeat_last_n: int,
        stop: List[str],
        seed: Optional[int],
        kv: Optional[str],
        kv_seed: Optional[int],
    ) -> Stream: ...
    def perplexity(
        self, text: str, ctx: int, max_windows: Optional[int], kv: Optional[str], kv_seed: int
    ) -> Dict[str, Any]: ...
    def logits(
        self, tokens: List[int], kv: Optional[str], kv_seed: int, prompt_tokens: Optional[int]
    ) -> Tuple[bytes, int, int]: ...
