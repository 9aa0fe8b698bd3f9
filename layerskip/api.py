"""The front door: one call each to load, generate, evaluate, calibrate and train.

    import layerskip

    model = layerskip.load("runs/layerskip")
    out = layerskip.generate(model, "The game", max_new_tokens=32, mode="ssd", draft_layer=3, k=4)
    print(out.text)

The `layerskip` command is a thin layer over these functions. Heavy modules (torch and the
rest) are imported inside them, so that `import layerskip` and `layerskip --help` stay instant.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from layerskip.console import log
from layerskip.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from layerskip.checkpoint import Checkpoint
    from layerskip.decoding import Strategy
    from layerskip.evaluation import EvalResult
    from layerskip.thresholds import Thresholds
    from layerskip.training import TrainResult

DEFAULT_CONF = 0.9  # the seed study's global DEE threshold, used when neither conf nor thresholds is given

SSD_OPTIONS = ("draft_layer", "k", "adaptive_threshold", "draft_vocab", "max_backoff", "bonus")
DEE_OPTIONS = ("thresholds", "conf", "measure", "exit_vocab", "min_exit_layer", "check_every")


def load(path: str | os.PathLike[str], *, device: str = "auto", dtype: str | torch.dtype | None = "auto") -> Checkpoint:
    """A model -> a Checkpoint with ``.model``, ``.tokenizer``, ``.config`` and ``.path``.

    `path`: a layerskip run directory (meaning its best checkpoint, else its last), a checkpoint
    directory, a Hugging Face Llama directory (read in place, nothing written) or ``hf:OWNER/NAME``
    (downloaded from the hub; the ``hub`` extra). ``device``: auto (CUDA when present), cpu, cuda
    or mps. ``dtype``: float32, bfloat16, float16, or auto (float32 on the CPU below 30M
    parameters where layerskip's bf16 kernels run, else below 500M; bfloat16 from there and on
    CUDA; see layerskip.dtypes). The model is in eval mode, ready to generate.
    """
    from layerskip.checkpoint import load_checkpoint
    from layerskip.device import resolve_device
    from layerskip.dtypes import parse_dtype

    return load_checkpoint(path, device=resolve_device(device), dtype=parse_dtype(dtype))


def _loaded(model: Checkpoint | str | os.PathLike[str], **how: Any) -> Checkpoint:
    """`model` itself, or what ``load(model, **how)`` returns for a path."""
    from layerskip.checkpoint import Checkpoint

    return model if isinstance(model, Checkpoint) else load(model, **how)


@dataclass
class Generation:
    """What ``generate`` returns: the new text and tokens, plus the strategy's statistics."""

    text: str  # the continuation, as it reads after the prompt
    tokens: list[int]  # the new token ids
    prompt_tokens: list[int]
    stats: dict[str, Any]  # tokens_per_second, ms_per_token, stop_reason, acceptance_rate (ssd), mean_exit_layer (dee)
    token_info: list[dict[str, Any]] = field(default_factory=list)  # per new token: exit layer, or accepted draft


def generate(
    model: Checkpoint | str | os.PathLike[str],
    prompt: str,
    *,
    mode: str = "ar",
    max_new_tokens: int = 100,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_at_eol: bool = False,
    on_tokens: Callable[[list[int]], None] | None = None,
    **options: Any,
) -> Generation:
    """Continue `prompt` with autoregressive ("ar"), self-speculative ("ssd") or early-exit ("dee") decoding.

    Temperature 0 (the default) is greedy; greedy ssd and dee with an unreachable threshold
    produce exactly what greedy ar produces. Mode options:

    - ssd: ``draft_layer`` (E, default half the layers), ``k`` (drafts per round, default 4),
      ``adaptive_threshold``, ``draft_vocab`` (draft through a short head), ``max_backoff``, ``bonus``.
    - dee: ``thresholds`` (a thresholds.json path, or what ``calibrate`` returned) or ``conf``
      (one threshold for every layer, default 0.9); ``measure``, ``exit_vocab``,
      ``min_exit_layer``, ``check_every`` (default: the thresholds file's).

    ``on_tokens`` is called with each batch of newly committed token ids (streaming).
    Generation stops at the model's end-of-sequence tokens when its tokenizer names them (Hugging
    Face models, at any of them when the configs list several; layerskip's own end every line with
    theirs, so they have none), or with
    ``stop_at_eol`` at the first end of line. An option that does not belong to `mode` is a ConfigError.
    """
    import torch

    from layerskip.decoding import SamplingConfig

    ckpt = _loaded(model)
    strategy = build_strategy(ckpt.model, mode, **options)
    sampling = SamplingConfig(temperature, top_k, top_p)
    prompt_ids = ckpt.tokenizer.encode(prompt)
    device = ckpt.model.embed_tokens.weight.device
    result = strategy.generate(
        ckpt.model,
        prompt_ids,
        max_new_tokens,
        sampling=sampling,
        stop_ids=stop_tokens(ckpt.tokenizer, stop_at_eol),
        generator=torch.Generator(device=device).manual_seed(seed),
        on_tokens=on_tokens,
    )
    return Generation(
        text=continuation(ckpt.tokenizer, prompt_ids, result.tokens),
        tokens=result.tokens,
        prompt_tokens=prompt_ids,
        stats=result.summary(),
        token_info=result.token_info,
    )


def stop_tokens(tokenizer: Any, stop_at_eol: bool) -> tuple[int, ...]:
    """The tokens generation stops at: the end of line when asked for, else the model's end-of-sequence ones."""
    if not stop_at_eol:
        return tuple(tokenizer.stop_ids)
    if tokenizer.eol_id is None:
        raise ConfigError("this model's tokenizer has no single end-of-line token, so it cannot stop at one; "
                          "drop stop_at_eol (--stop_at_eol)")
    return (tokenizer.eol_id,)


def continuation(tokenizer: Any, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
    """The new text as it reads after the prompt (decoding it alone would drop its leading space)."""
    before, after = tokenizer.decode(list(prompt_ids)), tokenizer.decode(list(prompt_ids) + list(new_ids))
    return after[len(before) :] if after.startswith(before) else tokenizer.decode(list(new_ids))


def build_strategy(model: torch.nn.Module, mode: str, **options: Any) -> Strategy:
    """The decoding strategy for `mode` with its options; unset options take their documented defaults."""
    from layerskip.decoding import MODES, make_strategy

    if mode not in MODES:
        raise ConfigError(f"unknown generation mode {mode!r}; choose one of {', '.join(MODES)}")
    allowed = {"ar": (), "ssd": SSD_OPTIONS, "dee": DEE_OPTIONS}[mode]
    unknown = sorted(set(options) - set(SSD_OPTIONS) - set(DEE_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown generation option(s) {unknown}; mode ssd takes {list(SSD_OPTIONS)}, "
                          f"mode dee takes {list(DEE_OPTIONS)}")
    misplaced = sorted(name for name, value in options.items() if value is not None and name not in allowed)
    if misplaced:
        raise ConfigError(f"option(s) {misplaced} do not apply to mode {mode!r}")
    given = {name: value for name, value in options.items() if value is not None}
    if mode == "ssd":
        given.setdefault("draft_layer", max(1, model.num_layers // 2))
        return make_strategy("ssd", **given)
    if mode == "dee":
        return _early_exit(model, **given)
    return make_strategy("ar")


def _early_exit(model: torch.nn.Module, *, thresholds: Thresholds | str | os.PathLike[str] | None = None,
                conf: float | None = None, measure: str | None = None, exit_vocab: int | None = None,
                min_exit_layer: int | None = None, check_every: int | None = None) -> Strategy:
    """DynamicEarlyExit from one global threshold, or from calibrated thresholds whose settings are the defaults."""
    from layerskip.decoding.dee import DynamicEarlyExit

    if conf is not None and thresholds is not None:
        raise ConfigError("give either conf (one global threshold) or thresholds (calibrated), not both")
    if thresholds is None:
        return DynamicEarlyExit(DEFAULT_CONF if conf is None else conf, measure or "softmax",
                                1 if min_exit_layer is None else min_exit_layer,
                                1 if check_every is None else check_every, exit_vocab=exit_vocab)
    from layerskip.thresholds import thresholds_for

    policy = thresholds_for(model, thresholds, measure)
    overridden = [f"--{name} {value} (calibrated with {calibrated})"
                  for name, value, calibrated in (("min_exit_layer", min_exit_layer, policy.min_exit_layer),
                                                   ("check_every", check_every, policy.check_every),
                                                   ("exit_vocab", exit_vocab, policy.exit_vocab))
                  if value is not None and value != calibrated]
    if overridden:
        log(f"warning: {', '.join(overridden)}: the guarantee in {policy.path} holds only for the policy it was "
            "calibrated for")
    return policy.strategy(min_exit_layer=min_exit_layer, check_every=check_every, exit_vocab=exit_vocab)


def evaluate(model: Checkpoint | str | os.PathLike[str], split: str = "test", *,
             data_dir: str | os.PathLike[str] | None = None, batch_size: int = 16,
             max_tokens: int | None = None, device: str = "auto", dtype: str | None = "auto") -> EvalResult:
    """Loss, token- and word-level perplexity of every exit 1..L on a WikiText-2 split ("valid" or "test").

    ``.table()`` prints it; ``.layers[-1]`` is the full model. ``data_dir`` defaults to
    $LAYERSKIP_DATA_DIR, then the per-user cache, then a download. ``device`` and ``dtype`` apply
    when `model` is a path (as in ``load``).
    """
    from layerskip.evaluation import evaluate_checkpoint

    return evaluate_checkpoint(_loaded(model, device=device, dtype=dtype), split=split, data_dir=data_dir,
                               batch_size=batch_size, max_tokens=max_tokens)


def calibrate(model: Checkpoint | str | os.PathLike[str], *, delta: float = 0.01, epsilon: float = 0.05,
              output: str | os.PathLike[str] | None = None, dtype: str | None = "auto", **options: Any) -> Thresholds:
    """Per-layer DEE thresholds whose disagreement with the full model is <= delta with probability >= 1 - epsilon.

    Reads only the validation split. ``output``: also write thresholds.json there. Options as
    `layerskip calibrate` (measure, method, exit_vocab, min_exit_layer, check_every, data_dir,
    max_tokens, gen_prompts, device, ...); ``device`` and ``dtype`` apply when `model` is a path (as
    in ``load``). Pass the result to ``generate(..., mode="dee", thresholds=...)``.
    """
    from layerskip.calibration import calibrate_checkpoint

    ckpt = _loaded(model, device=options.get("device", "auto"), dtype=dtype)
    return calibrate_checkpoint(ckpt, delta=delta, epsilon=epsilon, output=output, **options)


def train(out_dir: str | os.PathLike[str], *, data_dir: str | os.PathLike[str] | None = None, resume: bool = False,
          overwrite: bool = False, device: str = "auto", progress: bool = True,
          init_from: Checkpoint | str | os.PathLike[str] | None = None, **settings: Any) -> TrainResult:
    """Train a model into out_dir (best/, last/, metrics.jsonl); settings are TrainConfig's fields.

    LayerSkip is on by default (layer dropout + early-exit loss); ``max_skip_prob=0,
    early_exit_scale=0`` trains a plain model. ``resume=True`` continues the run in out_dir.
    ``init_from``: continual training from a checkpoint (anything ``load`` reads, or what it
    returned): its weights, tokenizer and shape, a fresh optimizer, the settings given here;
    a shape setting (d_model, num_layers, ...) that disagrees with it is a ConfigError.
    Returns the result, whose ``.best`` is the best checkpoint's path.
    """
    from layerskip.training import TrainConfig, init_config, load_start, resume_config, same_start
    from layerskip.training import train as run_training

    start = None
    if resume:
        if init_from is not None:  # naming the run's start again is fine; another start is refused
            settings["init_from"] = same_start(init_from)
        cfg = resume_config(out_dir, settings)
    elif init_from is not None:
        start = load_start(init_from)
        cfg = init_config(start, settings)
    else:
        cfg = TrainConfig.from_dict(settings)
    return run_training(cfg, out_dir, data_dir=data_dir, resume=resume, overwrite=overwrite, device=device,
                        progress=progress, init_checkpoint=start)
