"""Reading a SentencePiece ModelProto without protobuf: the pieces and settings tokenizer.json needs."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from layerskip.errors import CheckpointError


@dataclass
class SpmModel:
    """What a tokenizer.json needs from a SentencePiece ModelProto (read without protobuf)."""

    pieces: list[tuple[str, float, int]] = field(default_factory=list)  # (piece, score, type)
    model_type: int = 1  # 1 unigram, 2 bpe, 3 word, 4 char
    byte_fallback: bool = False
    character_coverage: float = 0.9995
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True

    NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    """The base-128 varint starting at ``buf[i]``: (value, index after it)."""
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of a serialized protobuf message."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def read_spm(proto: bytes) -> SpmModel:
    """Parse the parts of sentencepiece_model.proto we need (field numbers from that file)."""
    spm = SpmModel()
    try:
        for number, _, value in _fields(proto):
            if number == 1:  # SentencePiece
                spm.pieces.append(_piece(value))
            elif number == 2:  # TrainerSpec
                _read_trainer_spec(value, spm)
            elif number == 3:  # NormalizerSpec
                _read_normalizer_spec(value, spm)
    except (IndexError, ValueError, struct.error, UnicodeDecodeError) as exc:
        raise CheckpointError(f"the SentencePiece model cannot be parsed ({exc})") from None
    return spm


def _piece(message: bytes) -> tuple[str, float, int]:
    piece, score, kind = "", 0.0, SpmModel.NORMAL
    for n, _, v in _fields(message):
        if n == 1:
            piece = v.decode("utf-8")
        elif n == 2:
            score = struct.unpack("<f", v)[0]
        elif n == 3:
            kind = v
    return piece, score, kind


def _read_trainer_spec(message: bytes, spm: SpmModel) -> None:
    for n, _, v in _fields(message):
        if n == 3:
            spm.model_type = v
        elif n == 35:
            spm.byte_fallback = bool(v)
        elif n == 10:
            spm.character_coverage = struct.unpack("<f", v)[0]


def _read_normalizer_spec(message: bytes, spm: SpmModel) -> None:
    for n, _, v in _fields(message):
        if n == 2:
            spm.precompiled_charsmap = bytes(v)
        elif n == 3:
            spm.add_dummy_prefix = bool(v)
        elif n == 4:
            spm.remove_extra_whitespaces = bool(v)
        elif n == 5:
            spm.escape_whitespaces = bool(v)
