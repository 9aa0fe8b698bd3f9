"""A second GGUF file as the draft model of llama-cpp-python's speculative decoding.

llama-cpp-python's ``Llama(model_path, draft_model=...)`` takes any callable that maps the token
ids so far to proposed next tokens; it verifies them with the full model in one batch. This
one proposes greedily with another llama.cpp model, such as the draft file of
``layerskip export-gguf --draft_layer E --draft_out draft.gguf``::

    from llama_cpp import Llama
    from layerskip.gguf import GGUFDraft

    llm = Llama("model.gguf", draft_model=GGUFDraft("draft.gguf", num_tokens=4), n_threads=1)
    print(llm("The game", max_tokens=64, temperature=0)["choices"][0]["text"])

It keeps its own cache of the ids it has seen and re-decodes only from where a new call's ids
differ (after a rejected draft, or a new prompt).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from layerskip.errors import ConfigError


class GGUFDraft:
    """Greedy draft proposals from a llama.cpp model (llama-cpp-python's draft_model interface)."""

    def __init__(self, path: str | Path, num_tokens: int = 4, **llama_kwargs: Any) -> None:
        try:
            import llama_cpp
        except ImportError:
            raise ConfigError('GGUFDraft needs llama-cpp-python: pip install -e ".[llamacpp]"') from None
        if not (isinstance(num_tokens, int) and num_tokens >= 1):
            raise ConfigError(f"num_tokens (tokens proposed per call) must be an integer >= 1, got {num_tokens!r}")
        self._logits_ith = llama_cpp.llama_get_logits_ith
        self.llm = llama_cpp.Llama(model_path=str(path), **{"verbose": False, **llama_kwargs})
        self.num_tokens = num_tokens

    def reset(self) -> None:
        """Forget the cache (the next call decodes its ids from the start)."""
        self.llm.reset()

    def __call__(self, input_ids: np.ndarray, /, **kwargs: Any) -> np.ndarray:
        """Up to num_tokens greedy proposals after input_ids (fewer where the draft's context ends)."""
        ids = [int(t) for t in input_ids]
        room = self.llm.n_ctx() - len(ids)
        if not ids or room < 1:
            return np.array([], dtype=np.intc)
        cached = self.llm.input_ids[: self.llm.n_tokens].tolist()
        keep = 0
        while keep < min(len(cached), len(ids) - 1) and cached[keep] == ids[keep]:
            keep += 1  # the newest id is always decoded again: its logits are the first proposal's
        self.llm.n_tokens = keep  # Llama.eval drops the cache after n_tokens
        proposals: list[int] = []
        pending = ids[keep:]
        while len(proposals) < min(self.num_tokens, room):
            self.llm.eval(pending)
            logits = np.ctypeslib.as_array(self._logits_ith(self.llm.ctx, -1), shape=(self.llm.n_vocab(),))
            proposals.append(int(logits.argmax()))
            pending = proposals[-1:]
        return np.array(proposals, dtype=np.intc)
