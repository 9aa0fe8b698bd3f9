"""`layerskip bench`: AR, dynamic early exit and self-speculative decoding of one or two
checkpoints on the same seeded test-split prompts, timed honestly -> one results.json.

The document's fields are described in docs/results_schema.md. The scripts in benchmarks/
load their models and prompts through layerskip.bench.models.
"""

from layerskip.bench.metrics import fidelity, generated_perplexity, lcs_length, rouge_l
from layerskip.bench.models import BenchModel, best_case, load_model, random_model
from layerskip.bench.prompts import Prompt, is_paragraph, paragraph_prompts, prompt_ids, random_prompts, select_prompts
from layerskip.bench.run import RESULTS_FORMAT, SCHEMA_VERSION, run_bench, write_results
from layerskip.bench.settings import DEFAULT_DEE_THRESHOLDS, BenchConfig, BenchSettings, Run, build_configs

__all__ = [
    "DEFAULT_DEE_THRESHOLDS", "RESULTS_FORMAT", "SCHEMA_VERSION", "BenchConfig", "BenchModel", "BenchSettings",
    "Prompt", "Run", "best_case", "build_configs", "fidelity", "generated_perplexity", "is_paragraph",
    "lcs_length", "load_model", "paragraph_prompts", "prompt_ids", "random_model", "random_prompts", "rouge_l",
    "run_bench", "select_prompts", "write_results",
]
