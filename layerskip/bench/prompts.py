"""The prompts every benchmark decodes: seeded random paragraphs of the WikiText-2 test split.

`layerskip bench` and the scripts in benchmarks/ choose them here, so their numbers are
measured on the same kind of prompt; a model without a tokenizer gets seeded random ids.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from layerskip.data import find_split_files, read_lines, resolve_data_dir
from layerskip.errors import DataError
from layerskip.tokenizer import Tokenizer

# Random prompts skip ids 0..2: a layerskip tokenizer's unknown pieces and end of line.
FIRST_TEXT_ID = 3


@dataclass
class Prompt:
    paragraph: int  # line number in the test split
    text: str  # the paragraph line, as in the file


def is_paragraph(line: str) -> bool:
    s = line.strip()
    return bool(s) and not (s.startswith("=") and s.endswith("="))


def select_prompts(lines: Sequence[str], tokenizer: Tokenizer, num_prompts: int, prompt_tokens: int,
                   seed: int) -> list[Prompt]:
    """Seeded random paragraphs (at most num_prompts) long enough for a prompt plus one token."""
    candidates = [
        i for i, line in enumerate(lines)
        if is_paragraph(line) and len(tokenizer.encode(line)) > prompt_tokens
    ]
    if not candidates:
        raise DataError(
            f"no paragraph of the test split has more than {prompt_tokens} tokens; "
            "lower --prompt_tokens"
        )
    rng = random.Random(seed)
    chosen = rng.sample(candidates, min(num_prompts, len(candidates)))
    return [Prompt(paragraph=i, text=lines[i]) for i in chosen]


def prompt_ids(prompt: Prompt, tokenizer: Tokenizer, prompt_tokens: int) -> list[int]:
    return tokenizer.encode(prompt.text)[:prompt_tokens]


def paragraph_prompts(tokenizer: Tokenizer, num_prompts: int, prompt_tokens: int, seed: int = 0,
                       data_dir: str | Path | None = None) -> list[list[int]]:
    """The token ids of `layerskip bench`'s prompts: select_prompts on the test split (data_dir,
    else $LAYERSKIP_DATA_DIR or the cache)."""
    lines = read_lines(find_split_files(resolve_data_dir(data_dir))["test"])
    prompts = select_prompts(lines, tokenizer, num_prompts, prompt_tokens, seed)
    return [prompt_ids(p, tokenizer, prompt_tokens) for p in prompts]


def random_prompts(vocab_size: int, num_prompts: int, prompt_tokens: int, seed: int = 0) -> list[list[int]]:
    """Seeded random token ids, for a model that has no tokenizer (a random model)."""
    rng = random.Random(seed)
    return [[rng.randrange(FIRST_TEXT_ID, vocab_size) for _ in range(prompt_tokens)] for _ in range(num_prompts)]
