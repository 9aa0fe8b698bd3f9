"""Dynamic early exit's confidence measures, each in [0, 1] (their names: ``layerskip.config.MEASURES``).

- ``softmax``: the exit distribution's largest probability (the seed study's measure).
- ``margin``: top-1 minus top-2 probability.
- ``saturation``: cosine similarity of the hidden states after blocks l-1 and l (after 0
  blocks: the embedding), clamped to [0, 1]. It needs no LM head, so a token costs one
  head evaluation (at its exit) whatever the number of checked layers; with the other two
  every checked layer costs a head evaluation.
- ``classifier``: CALM's learned early-exit classifier (``ExitClassifier``): per checked
  layer, a small model fit by ``layerskip calibrate --measure classifier`` predicts the
  probability that the exit's top-1 equals the last layer's top-1, from features that cost
  little: the exit's RMS-normalised hidden state, the (unclamped) cosine with the previous
  layer's hidden state, and the largest probability through a short head of the
  ``vocab`` most frequent tokens. Its weights live in the thresholds file, so this measure
  exists only with one (a global threshold has no classifier to read).
"""

from __future__ import annotations

import base64
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from layerskip import kernels
from layerskip.config import GLOBAL_MEASURES, MEASURES
from layerskip.errors import ConfigError
from layerskip.fastpath import DerivedWeights
from layerskip.model import normalize

HIDDEN_MEASURES = ("saturation",)  # computed from hidden states, without the head
LEARNED_MEASURES = tuple(m for m in MEASURES if m not in GLOBAL_MEASURES)  # weights a calibration fits
LOGIT_MEASURES = tuple(m for m in GLOBAL_MEASURES if m not in HIDDEN_MEASURES)
CLASSIFIER_FEATURES = ("normalised hidden state (d_model values)", "cosine with the previous hidden state",
                       "largest probability through the classifier's short head")
CLASSIFIER_VOCAB = 256  # tokens in the short head whose largest probability is a feature


def logit_confidence(logits: torch.Tensor, measure: str) -> torch.Tensor:
    """Confidence of exit logits (..., V) -> (...): softmax maximum or top-1 minus top-2."""
    if measure not in LOGIT_MEASURES:
        raise ConfigError(f"measure {measure!r} is not computed from logits")
    probs = torch.softmax(logits.float(), dim=-1)  # one kernel: cheaper per check than logsumexp
    if measure == "softmax":
        return probs.amax(dim=-1)
    top2 = torch.topk(probs, 2, dim=-1).values  # (..., 2)
    return top2[..., 0] - top2[..., 1]


def saturation_confidence(hidden: torch.Tensor, prev_hidden: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of consecutive layers' hidden states (..., C) -> (...), clamped to [0, 1]."""
    cos = torch.nn.functional.cosine_similarity(hidden.float(), prev_hidden.float(), dim=-1)
    return cos.clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- the learned classifier

Layer = list[tuple[torch.Tensor, torch.Tensor]]  # linear layers (weight (out, in), bias (out,)), ReLU between


def classifier_features(decoder: Any, hidden: torch.Tensor, prev_hidden: torch.Tensor,
                        vocab: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """(features (..., C + 2), (short logits (..., N), their ids)) of exit hidden states (..., C).

    decoder: a FastDecoder or the Transformer (both have ``unembed_short``); the short logits
    come back so that an exit through the same short head does not compute them twice.
    """
    model = getattr(decoder, "model", decoder)
    short, ids = decoder.unembed_short(hidden, vocab)  # (..., N)
    h = hidden.float()
    cos = torch.nn.functional.cosine_similarity(h, prev_hidden.float(), dim=-1)  # (...)
    top = torch.softmax(short.float(), dim=-1).amax(dim=-1)  # (...)
    return torch.cat((normalize(h, model.norm.eps), cos.unsqueeze(-1), top.unsqueeze(-1)), dim=-1), (short, ids)


@dataclass
class ExitClassifier:
    """Per exit layer, a logistic regression (one linear layer) or a one-hidden-layer MLP on
    ``classifier_features``; its sigmoid output is the probability that the exit agrees with
    the last layer, DEE's confidence. Input standardisation is folded into the first layer."""

    vocab: int  # tokens in the short head of the largest-probability feature
    layers: dict[int, Layer]  # exit layer (1..L-1) -> its network; layers without one never exit
    info: dict[str, Any] = field(default_factory=dict)  # how it was fit (recorded in the file)
    _placed: dict[torch.device, dict[int, Layer]] = field(default_factory=dict, repr=False, compare=False)
    _derived: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, repr=False, compare=False)

    @property
    def num_features(self) -> int:
        return int(next(iter(self.layers.values()))[0][0].shape[1]) if self.layers else 0

    @property
    def hidden(self) -> int:
        """Units of the hidden layer (0: logistic regression)."""
        net = next(iter(self.layers.values()), None)
        return 0 if net is None or len(net) == 1 else int(net[0][0].shape[0])

    def score(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """P(agreement) of features (..., F) at an exit layer -> (...)."""
        x = features
        net = self._on(features.device)[layer]
        for i, (weight, bias) in enumerate(net):
            x = torch.nn.functional.linear(x, weight, bias)
            if i < len(net) - 1:
                x = torch.relu(x)
        return torch.sigmoid(x.squeeze(-1))

    def confidence(self, decoder: Any, hidden: torch.Tensor, prev_hidden: torch.Tensor,
                   layer: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """(confidence (...), (short logits (..., N), ids)) of exit hidden states (..., C) after block `layer`.

        ``score(layer, classifier_features(...))`` up to rounding, in fewer operations (a decoding
        step pays per operation): one product gives the short head's logits and the first
        layer's hidden-state term together, and the hidden state is normalised once.
        """
        model = getattr(decoder, "model", decoder)
        fused, ids, extra, bias, rest = self._decision(model, layer)
        n = ids.numel()
        z = normalize(hidden.float(), model.norm.eps) @ fused  # (..., N + H1)
        short = z[..., :n]
        top = torch.softmax(short, dim=-1).amax(dim=-1, keepdim=True)  # (..., 1)
        cos = torch.nn.functional.cosine_similarity(hidden.float(), prev_hidden.float(), dim=-1).unsqueeze(-1)
        x = torch.addcmul(torch.addcmul(z[..., n:] + bias, cos, extra[0]), top, extra[1])  # (..., H1)
        for weight, b in rest:  # the MLP's output layer
            x = torch.nn.functional.linear(torch.relu(x), weight, b)
        return torch.sigmoid(x.squeeze(-1)), (short, ids)

    def check_model(self, model: torch.nn.Module, layers: list[int] | None = None) -> None:
        """Refuse a model of another width, or exit layers (`layers`) without a network."""
        width = model.config.d_model + 2
        if self.num_features != width:
            raise ConfigError(f"the exit classifier reads {self.num_features} features, but this model's exits give "
                              f"{width} (d_model {model.config.d_model} + 2); calibrate again for this model")
        missing = sorted(set(layers or []) - set(self.layers))
        if missing:
            raise ConfigError(f"the exit classifier has no weights for layer(s) {missing}, where a finite threshold "
                              "asks for a check; calibrate again")

    def _decision(self, model: torch.nn.Module, layer: int) -> tuple:
        """(fused (C, N + H1), ids (N,), (w_cos, w_top) each (H1,), b1 (H1,), the rest of the network) for
        `confidence`, derived from the model's head and this layer's weights; rebuilt when they change."""
        derived = self._derived.get(model)
        if derived is None:
            derived = self._derived[model] = DerivedWeights()

        def sources() -> tuple[torch.Tensor, ...]:
            counts = () if model.token_counts is None else (model.token_counts,)
            return (model.lm_head.weight, model.norm.weight, *counts)

        def build() -> tuple:
            device = model.lm_head.weight.device
            (w1, b1), *rest = self._on(device)[layer]
            width = w1.shape[1] - 2
            with torch.no_grad():
                ids = model.frequent_ids(min(self.vocab, model.config.vocab_size))
                fused = torch.cat((model.folded_head(ids).float(), w1[:, :width].t()), dim=1).contiguous()
            return fused, ids, (w1[:, width], w1[:, width + 1]), b1, rest

        return derived.get(layer, sources, build) or build()

    def heads_exits(self, exit_vocab: int | None) -> bool:
        """Whether its short head is the exit head (`exit_vocab` tokens), so an exit reuses a check's logits."""
        return exit_vocab == self.vocab

    def kernel_layer(self, model: torch.nn.Module, layer: int) -> kernels.ClassifierLayer:
        """This layer's network in the fused form ``confidence`` computes, for ``kernels.f32_decode``."""
        fused, _, (w_cos, w_top), b1, rest = self._decision(model, layer)
        w2, b2 = rest[0] if rest else (None, None)
        return kernels.ClassifierLayer(fused, w_cos, w_top, b1, None if w2 is None else w2.reshape(-1), b2)

    def _on(self, device: torch.device) -> dict[int, Layer]:
        placed = self._placed.get(device)
        if placed is None:  # weights from a file live on the CPU; a CUDA model reads its own copies
            placed = self._placed[device] = {layer: [(w.to(device), b.to(device)) for w, b in net]
                                            for layer, net in self.layers.items()}
        return placed

    # -- the thresholds file's "classifier" entry ----------------------------------------

    def to_record(self) -> dict[str, Any]:
        """A JSON object: vocab, features, hidden, and per layer its linear layers as float32 base64."""
        return {
            "vocab": self.vocab,
            "features": list(CLASSIFIER_FEATURES),
            "hidden": self.hidden,
            "layers": {str(layer): [{"weight": _encode(w), "bias": _encode(b)} for w, b in net]
                       for layer, net in sorted(self.layers.items())},
            "encoding": "each tensor: its shape and its float32 values, little-endian, row-major, base64",
            **self.info,
        }

    @classmethod
    def from_record(cls, record: Any, num_layers: int) -> ExitClassifier:
        """The classifier in a thresholds file's "classifier" entry; ConfigError naming what is wrong."""
        if not isinstance(record, dict) or not isinstance(record.get("layers"), dict):
            raise ConfigError("'classifier' must be an object with 'vocab' and 'layers' (the weights "
                              "`layerskip calibrate --measure classifier` writes)")
        vocab = record.get("vocab")
        if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 2:
            raise ConfigError(f"classifier 'vocab' must be an integer >= 2, got {vocab!r}")
        layers = {_layer_number(key, num_layers): _network(key, net) for key, net in record["layers"].items()}
        widths = {net[0][0].shape[1] for net in layers.values()}
        if len(widths) > 1:
            raise ConfigError(f"classifier layers read different numbers of features {sorted(widths)}")
        info = {k: v for k, v in record.items() if k not in ("vocab", "features", "hidden", "layers", "encoding")}
        return cls(vocab=vocab, layers=layers, info=info)


def _encode(tensor: torch.Tensor) -> dict[str, Any]:
    values = tensor.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4")
    return {"shape": list(values.shape), "float32_base64": base64.b64encode(values.tobytes()).decode("ascii")}


def _decode(entry: Any, what: str) -> torch.Tensor:
    if not (isinstance(entry, dict) and isinstance(entry.get("shape"), list)
            and isinstance(entry.get("float32_base64"), str)):
        raise ConfigError(f"classifier {what} must be an object with 'shape' and 'float32_base64'")
    shape = entry["shape"]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape):
        raise ConfigError(f"classifier {what}: bad shape {shape!r}")
    try:
        raw = base64.b64decode(entry["float32_base64"], validate=True)
    except ValueError:
        raise ConfigError(f"classifier {what}: 'float32_base64' is not base64") from None
    if len(raw) != 4 * int(np.prod(shape)):
        raise ConfigError(f"classifier {what}: {len(raw)} bytes do not hold a float32 tensor of shape {shape}")
    values = np.frombuffer(raw, dtype="<f4").reshape(shape)
    if not np.isfinite(values).all():
        raise ConfigError(f"classifier {what} holds NaN or infinite values")
    return torch.from_numpy(values.astype(np.float32))


def _layer_number(key: str, num_layers: int) -> int:
    if not (isinstance(key, str) and key.isdigit() and 1 <= int(key) < num_layers):
        raise ConfigError(f"classifier layer {key!r} is not an exit layer of this {num_layers}-layer model "
                          f"(1..{num_layers - 1})")
    return int(key)


def _network(key: str, net: Any) -> Layer:
    """A layer's linear layers, checked to chain: (H, F) then (1, H), or one (1, F)."""
    if not isinstance(net, list) or len(net) not in (1, 2):
        raise ConfigError(f"classifier layer {key}: expected a list of 1 (logistic) or 2 (MLP) linear layers")
    layers = []
    for i, linear in enumerate(net):
        where = f"layer {key}, linear {i}"
        if not isinstance(linear, dict):
            raise ConfigError(f"classifier {where} must be an object with 'weight' and 'bias'")
        weight, bias = _decode(linear.get("weight"), f"{where} weight"), _decode(linear.get("bias"), f"{where} bias")
        if weight.dim() != 2 or bias.shape != (weight.shape[0],):
            raise ConfigError(f"classifier {where}: weight {list(weight.shape)} and bias {list(bias.shape)} do not "
                              "form a linear layer (weight (out, in), bias (out,))")
        if layers and weight.shape[1] != layers[-1][0].shape[0]:
            raise ConfigError(f"classifier {where}: reads {weight.shape[1]} inputs, the layer before gives "
                              f"{layers[-1][0].shape[0]}")
        layers.append((weight, bias))
    if layers[-1][0].shape[0] != 1:
        raise ConfigError(f"classifier layer {key}: the last linear layer must have one output, "
                          f"has {layers[-1][0].shape[0]}")
    return layers
