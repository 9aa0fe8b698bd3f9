"""Hand-written CPU kernels, for the decoding work where torch's own leave speed or exactness unused.

On a CPU with AVX512-BF16, for at most MAX_ROWS rows (a decoding step, a verification) and no
gradient, ``decoding.c`` runs, for bfloat16 inputs:

- ``linear(x, weight)``, ``F.linear(x, weight)`` without bias: it reads the weights at about the
  machine's memory bandwidth, where torch's oneDNN products of a row read them at about two
  thirds of it (docs/results.md);
- ``attention(q, k, v, scale)``, causal attention of the newest queries over a KV cache, in
  float32 from bf16 inputs, without SDPA's fixed cost per call;

and for float32 models of the folded layout (``fastblock.FastBlock``):

- ``f32_decode``, a whole decoding step in one call: the embedding, the blocks (``f32_block``
  is one), and the head; or DEE's step with its checks after each checked layer, the exit,
  CALM propagation and the head; ``f32_unembed``, the head's product for a few rows.

All of them give a row the same bits whatever the other rows are, so verifying k drafts in one pass
gives exactly the logits of k one-token steps: greedy self-speculation equals greedy
autoregressive decoding in bf16 too (SDPA's masked path rounds rows differently from its
one-query path, and near-ties of bf16 logits then pick other tokens).

The C source is compiled on first use with the system's C compiler (``$CC``, else ``cc`` or
``gcc``) into a cache keyed by the source and flags (``$LAYERSKIP_KERNEL_CACHE``, default
``~/.cache/layerskip/kernels``), and loaded with ctypes: no build step at install, no Python
headers. It shares torch's OpenMP runtime (the already loaded ``libgomp.so.1``) and threads
(``torch.get_num_threads()``). Without such a CPU or a compiler, or with
``LAYERSKIP_KERNELS=0``, both are torch's (``F.linear``; SDPA or plain products): the same
results up to float32 rounding. ``status()`` says which.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from layerskip.console import log

# Read at every call, so tests and benchmarks may switch the kernels off and on.
ENABLED = os.environ.get("LAYERSKIP_KERNELS", "1") != "0"
MAX_ROWS = 16  # decoding's and verification's products; longer prefills are arithmetic-bound: oneDNN's
SOURCE = Path(__file__).with_name("decoding.c")
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC")
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
COMPILE_TIMEOUT_SECONDS = 120


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere: the kernels stay off)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "layerskip" / "kernels"
    return Path(os.environ.get("LAYERSKIP_KERNEL_CACHE") or default)


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def library_path() -> Path:
    """Where the compiled kernel lives: named by a hash of its source and flags, so an edit rebuilds it."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    return cache_dir() / f"{SOURCE.stem}-{digest}.so"


def compile_library(path: Path) -> None:
    """Compile SOURCE into path, atomically (a concurrent process's build is as good as ours)."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        proc = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                              timeout=COMPILE_TIMEOUT_SECONDS)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"{cc} failed: {last}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def open_library(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.bf16_linear.argtypes = [ptr, i64, ptr, ptr, i64, i64, i64, i64, ctypes.c_int]
    lib.bf16_attention.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, ctypes.c_float,
                                   ptr, ctypes.c_int]
    lib.f32_block.argtypes = [ctypes.POINTER(F32Block), ptr, i64, ptr, ptr, ptr, ptr, i64, i64, ptr, ctypes.c_int]
    lib.f32_block_scratch.argtypes = [ctypes.POINTER(F32Block), i64, i64]
    lib.f32_block_scratch.restype = i64
    lib.f32_decode.argtypes = [ctypes.POINTER(F32Model), i64, i64, ptr, ptr, i64, ptr, ptr, i64, i64,
                               ctypes.POINTER(F32Exits), ptr, i64, ptr, ptr, ctypes.c_int]
    lib.f32_decode.restype = i64
    lib.f32_unembed.argtypes = [ptr, i64, i64, ctypes.c_float, ptr, i64, ptr, ptr, ctypes.c_int]
    lib.f32_unembed.restype = None
    lib.bf16_linear.restype = lib.bf16_attention.restype = lib.f32_block.restype = None
    return lib


class F32Block(ctypes.Structure):
    """decoding.c's F32Block: a float32 block's folded weights (fastblock.FastBlock) and shape."""

    _fields_ = [("qkv_rot", ctypes.c_void_p), ("out", ctypes.c_void_p), ("gate_up", ctypes.c_void_p),
                ("down", ctypes.c_void_p), ("C", ctypes.c_int64), ("H", ctypes.c_int64), ("Hkv", ctypes.c_int64),
                ("D", ctypes.c_int64), ("F", ctypes.c_int64), ("eps", ctypes.c_float)]


class F32Model(ctypes.Structure):
    """decoding.c's F32Model: a float32 model's folded blocks, embedding, rotary tables and final norm."""

    _fields_ = [("blocks", ctypes.POINTER(F32Block)), ("L", ctypes.c_int64), ("embedding", ctypes.c_void_p),
                ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p), ("eps", ctypes.c_float)]


class F32Classifier(ctypes.Structure):
    """decoding.c's F32Classifier: the learned exit classifier's weights, per checked layer."""

    _fields_ = [("fused", ctypes.c_void_p), ("params", ctypes.c_void_p), ("Nc", ctypes.c_int64),
                ("H", ctypes.c_int64), ("mlp", ctypes.c_int), ("reuse", ctypes.c_int)]


class F32Exits(ctypes.Structure):
    """decoding.c's F32Exits: a dynamic-early-exit policy for ``f32_decode``."""

    _fields_ = [("thresholds", ctypes.c_void_p), ("head", ctypes.c_void_p), ("N", ctypes.c_int64),
                ("measure", ctypes.c_int), ("logits", ctypes.c_void_p),
                ("classifier", ctypes.POINTER(F32Classifier))]


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    """The loaded kernel (compiled first if needed), or None and why not; decided once per process."""
    missing = [flag for flag in REQUIRED_CPU_FLAGS if flag not in cpu_flags()]
    if missing:
        return None, f"off: the CPU lacks {', '.join(missing)}"
    path = library_path()
    try:
        if path.exists():
            try:
                return open_library(path), f"on: {path}"
            except (OSError, AttributeError):  # a damaged file in the cache: build it again
                path.unlink(missing_ok=True)
        compile_library(path)
        return open_library(path), f"on: {path} (compiled now)"
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        reason = f"off: could not compile {SOURCE.name} ({e})"
        log(f"layerskip: {reason}; decoding on CPU uses torch's slower calls instead "
            "(LAYERSKIP_KERNELS=0 skips the attempt)")
        return None, reason


def status() -> str:
    """Whether the kernels run on this machine, and why not (compiles them if needed)."""
    if not ENABLED:
        return "off: LAYERSKIP_KERNELS=0"
    return _library()[1]


def available() -> bool:
    return ENABLED and _library()[0] is not None


def _bf16_cpu(*tensors: torch.Tensor) -> bool:
    """All bfloat16 on the CPU, none in need of a gradient."""
    grad = torch.is_grad_enabled()
    return all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and not (grad and t.requires_grad) for t in tensors)


def _applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (_bf16_cpu(x, weight) and weight.dim() == 2 and weight.is_contiguous() and x.shape[-1] == weight.shape[1]
            and 0 < x.numel() <= MAX_ROWS * x.shape[-1] and weight.numel() > 0)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)``: x (..., K), weight (N, K) -> (..., N); through the bf16 kernel where it applies."""
    if not (ENABLED and _applies(x, weight)):
        return F.linear(x, weight)
    lib = _library()[0]
    if lib is None:
        return F.linear(x, weight)
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    (m, k), n = rows.shape, weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype)
    lib.bf16_linear(rows.data_ptr(), rows.stride(0), weight.data_ptr(), y.data_ptr(), n, m, n, k,
                    torch.get_num_threads())
    return y.view(*x.shape[:-1], n)


def attends(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``attention`` runs the kernel for these shapes (else the caller uses torch's attention)."""
    if not ENABLED or q.dtype != torch.bfloat16:  # the common float32 case, checked first: decoding asks per block
        return False
    b, heads, t, d = q.shape
    return (_bf16_cpu(q, k, v) and k.shape == v.shape and k.shape[0] == b and k.shape[3] == d
            and 0 < t <= min(MAX_ROWS, k.shape[2]) and heads % k.shape[1] == 0
            and q.stride(3) == k.stride(3) == v.stride(3) == 1 and available())


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of q (B, H, T, D) at the last T of the S positions of k, v (B, H_kv, S, D) -> (B * T, H * D).

    Query t sees keys 0 .. S - T + t; query head h reads key/value head h // (H / H_kv); the
    scores are scaled by ``scale``. Only where ``attends(q, k, v)``.
    """
    lib = _library()[0]
    (b, heads, t, d), s = q.shape, k.shape[2]
    threads = torch.get_num_threads()
    out = torch.empty(b * t, heads * d, dtype=q.dtype)
    scratch = torch.empty(threads * (s + d), dtype=torch.float32)
    strides = [torch.tensor(x.stride(), dtype=torch.int64) for x in (q, k, v)]
    lib.bf16_attention(q.data_ptr(), strides[0].data_ptr(), k.data_ptr(), strides[1].data_ptr(), v.data_ptr(),
                       strides[2].data_ptr(), out.data_ptr(), b, heads, k.shape[1], t, s, d, scale,
                       scratch.data_ptr(), threads)
    return out


# ----------------------------------------------------------------------------- float32 blocks


def f32_block_layout(qkv_rot: torch.Tensor, out: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                     heads: int, kv_heads: int, eps: float) -> F32Block | None:
    """The kernel's view of a FastBlock's weights (which must outlive it), or None where the kernel cannot run them."""
    weights = (qkv_rot, out, gate_up, down)
    if not all(w.dtype == torch.float32 and w.device.type == "cpu" and w.is_contiguous() for w in weights):
        return None
    channels, d_ff = out.shape[1], down.shape[0]
    head_dim = out.shape[0] // heads
    return F32Block(*(w.data_ptr() for w in weights), channels, heads, kv_heads, head_dim, d_ff, eps)


def runs_f32_block(layout: F32Block | None, x: torch.Tensor, cache) -> bool:
    """Whether ``f32_block`` runs this block for rows x (B, T, C) with this KV cache."""
    return (ENABLED and layout is not None and x.dtype == torch.float32 and x.device.type == "cpu"
            and x.shape[0] == 1 and 0 < x.shape[1] <= MAX_ROWS and cache is not None and cache.k.shape[1] == 1
            and cache.k.dtype == torch.float32 and cache.k.device.type == "cpu"
            and not (torch.is_grad_enabled() and x.requires_grad) and available())


def f32_block(layout: F32Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache, layer: int,
              pos: int) -> torch.Tensor:
    """The block on rows x (1, T, C) at positions pos..pos+T-1 -> new rows; writes their keys and values to cache.

    cos, sin: (T, D). Only where ``runs_f32_block``.
    """
    lib = _library()[0]
    t = x.shape[1]
    keys, values = cache.reserve(layer, pos, t)  # (1, H_kv, max_len, D), contiguous
    rows = x.reshape(t, x.shape[2]).clone(memory_format=torch.contiguous_format)  # the kernel writes it in place
    cos, sin = cos.contiguous(), sin.contiguous()
    scratch = torch.empty(lib.f32_block_scratch(layout, t, pos + t), dtype=torch.float32)
    lib.f32_block(layout, rows.data_ptr(), t, cos.data_ptr(), sin.data_ptr(), keys.data_ptr(), values.data_ptr(),
                  keys.shape[2], pos, scratch.data_ptr(), torch.get_num_threads())
    return rows.view(x.shape)


# ----------------------------------------------------------------------------- float32 exit checks

# ----------------------------------------------------------------------------- float32 decoding steps


def unembeds(hidden: torch.Tensor, head: torch.Tensor) -> bool:
    """Whether ``f32_unembed`` runs for rows hidden (..., C) through head (C, N)."""
    return (ENABLED and hidden.dtype == head.dtype == torch.float32 and hidden.device.type == "cpu"
            and head.device.type == "cpu" and head.is_contiguous() and head.shape[0] == hidden.shape[-1]
            and 0 < hidden.numel() <= MAX_ROWS * hidden.shape[-1]
            and not (torch.is_grad_enabled() and hidden.requires_grad) and available())


def f32_unembed(hidden: torch.Tensor, head: torch.Tensor, eps: float) -> torch.Tensor:
    """normalize(hidden) @ head for rows hidden (..., C) and the folded head (C, N) -> (..., N), each row computed
    alike whatever the others (as ``f32_decode``'s head). Only where ``unembeds``."""
    lib = _library()[0]
    channels, n = head.shape
    rows = hidden.reshape(-1, channels)
    if not rows.is_contiguous():
        rows = rows.contiguous()
    logits, normalized = torch.empty(rows.shape[0], n, dtype=torch.float32), torch.empty(channels)
    lib.f32_unembed(rows.data_ptr(), rows.shape[0], channels, eps, head.data_ptr(), n, logits.data_ptr(),
                    normalized.data_ptr(), torch.get_num_threads())
    return logits.view(*hidden.shape[:-1], n)


class NativeModel:
    """A float32 model's folded blocks, embedding and rotary tables as ``f32_decode`` reads them.

    Holds the tensors it points into, so they live as long as it does.
    """

    def __init__(self, blocks: list[F32Block], embedding: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 eps: float, keep: tuple) -> None:
        self.blocks = (F32Block * len(blocks))(*blocks)
        self._tensors = (embedding, cos, sin, keep)
        self.struct = F32Model(self.blocks, len(blocks), embedding.data_ptr(), cos.data_ptr(), sin.data_ptr(), eps)
        self.num_layers, self.channels = len(blocks), embedding.shape[1]
        self.head_dim = cos.shape[1]


def native_model(blocks: list[F32Block | None], embedding: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 eps: float, keep: tuple) -> NativeModel | None:
    """The model for ``f32_decode``, or None where it cannot run it (a block the kernel cannot run, other
    dtypes or devices); keep: what owns the blocks' weights."""
    tables = (embedding, cos, sin)
    if any(b is None for b in blocks) or not all(
            t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tables):
        return None
    return NativeModel(blocks, embedding, cos, sin, eps, keep)


DECODE_MEASURES = ("softmax", "margin", "saturation", "classifier")  # f32_decode's, in decoding.c's order


@dataclass
class ClassifierLayer:
    """One exit layer's classifier network for the kernel (ExitClassifier.confidence's fused form):
    fused (C, Nc + H) = the short head's columns, then the first layer's hidden-state weights;
    w_cos, w_top, b1 (H); w2 (H) and b2 (1) for an MLP, None for logistic regression (H = 1)."""

    fused: torch.Tensor
    w_cos: torch.Tensor
    w_top: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor | None = None
    b2: torch.Tensor | None = None


def classifier_policy(layers: dict[int, ClassifierLayer], num_layers: int, short_vocab: int,
                      reuse: bool) -> F32Classifier:
    """decoding.c's F32Classifier for exit layers 1..L-1 (layers without a network: never checked);
    reuse: the short head is the exits' head, so an exit returns the check's logits."""
    hidden = next(iter(layers.values())).b1.numel() if layers else 1
    mlp = any(net.w2 is not None for net in layers.values())
    fused, params = [None] * (num_layers - 1), [None] * (num_layers - 1)
    for layer, net in layers.items():
        fused[layer - 1] = net.fused.detach().to(torch.float32).contiguous()
        w2 = net.w2 if net.w2 is not None else torch.ones(hidden)
        b2 = net.b2 if net.b2 is not None else torch.zeros(1)
        params[layer - 1] = torch.cat([t.detach().reshape(-1).to(torch.float32)
                                       for t in (net.w_cos, net.w_top, net.b1, w2, b2)])
    pointers = [(ctypes.c_void_p * (num_layers - 1))(*[None if t is None else t.data_ptr() for t in ts])
                for ts in (fused, params)]
    struct = F32Classifier(ctypes.addressof(pointers[0]), ctypes.addressof(pointers[1]), short_vocab, hidden,
                           int(mlp), int(reuse))
    struct._keep = (fused, params, pointers)
    return struct


def exit_policy(thresholds: list[float], head: torch.Tensor, measure: str,
                classifier: F32Classifier | None = None) -> tuple[F32Exits, torch.Tensor]:
    """(the policy for ``f32_decode``, the logits buffer its exits write) for thresholds of layers 1..L-1
    (math.inf: unchecked), measure one of DECODE_MEASURES (classifier: with ``classifier_policy``'s
    struct), and the exits' head (C, N), float32 and contiguous (softmax and margin also measure
    through it); the struct points into all of them."""
    if (measure == "classifier") != (classifier is not None):
        raise ValueError("the classifier measure needs its classifier_policy, and only it takes one")
    values = torch.tensor(thresholds, dtype=torch.float32)
    exact = torch.tensor(thresholds, dtype=torch.float64)
    # A float32 confidence c passes threshold t exactly when c >= the smallest float32 >= t.
    values = torch.where(values.double() < exact, torch.nextafter(values, torch.tensor(math.inf)), values)
    logits = torch.empty(head.shape[1], dtype=torch.float32)
    policy = F32Exits(values.data_ptr(), head.data_ptr(), head.shape[1], DECODE_MEASURES.index(measure),
                      logits.data_ptr(), None if classifier is None else ctypes.pointer(classifier))
    policy._keep = (values, head, logits, classifier)  # ctypes structures keep no references of their own
    return policy, logits


def runs_decode(model: NativeModel | None, cache, rows: int, x: torch.Tensor | None = None) -> bool:
    """Whether ``f32_decode`` runs rows (1..MAX_ROWS) of this model with this cache (and these hidden states
    x (1, T, C), when given rather than tokens)."""
    return (ENABLED and model is not None and 0 < rows <= MAX_ROWS and cache is not None and cache.k.shape[1] == 1
            and cache.k.dtype == torch.float32 and cache.k.device.type == "cpu"
            and (x is None or (x.dtype == torch.float32 and x.device.type == "cpu" and x.shape[0] == 1
                               and not (torch.is_grad_enabled() and x.requires_grad)))
            and available())


PHASES = ("blocks", "checks", "propagation", "head")  # f32_decode's phase_ns, in this order


def f32_decode(model: NativeModel, start: int, end: int, tokens: torch.Tensor | None, x: torch.Tensor, cache,
               pos: int, exits: F32Exits | None = None, head: torch.Tensor | None = None,
               logits: torch.Tensor | None = None, phase_ns: torch.Tensor | None = None) -> int:
    """Blocks [start, end) on the rows x (T, C) in place (first their tokens' embeddings when tokens (T,), int64,
    contiguous, is given) at positions pos..pos+T-1, writing their keys and values to cache; with exits, one
    row may exit early (and the layers it skipped get propagated keys and values); then, unless it exited,
    logits (N) = the last row through head (C, N). Returns the blocks run. Only where ``runs_decode``;
    the caller marks the cache's layers written. phase_ns: float64 (4,), the nanoseconds spent in each of
    PHASES are added to it (the clock read around each costs tens of nanoseconds)."""
    lib = _library()[0]
    t = x.shape[0]
    ran = lib.f32_decode(model.struct, start, end, None if tokens is None else tokens.data_ptr(), x.data_ptr(), t,
                         cache.k.data_ptr(), cache.v.data_ptr(), cache.k.shape[3], pos, exits,
                         None if head is None else head.data_ptr(), 0 if head is None else head.shape[1],
                         None if logits is None else logits.data_ptr(),
                         None if phase_ns is None else phase_ns.data_ptr(), torch.get_num_threads())
    if ran < 0:
        raise MemoryError("f32_decode could not allocate its scratch memory")
    return ran
