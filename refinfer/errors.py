"""One error hierarchy for everything a user can get wrong.

Every message names what was being read (file, tensor or key), where (byte offset), what was
found and what was expected. The CLI prints `error: <message>` and, when present, `hint: <hint>`.
"""

from __future__ import annotations


class RefinferError(Exception):
    """Base class: an error caused by input, not by a bug in refinfer. Every error carries a
    hint: the one its raise site gives, or its class's default."""

    default_hint = "python -m refinfer COMMAND --help lists the options and what they accept"

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint or self.default_hint


class FormatError(RefinferError):
    """A file is malformed: truncated, bad magic, out-of-range offsets, inconsistent sizes."""

    default_hint = ("the file is damaged or not in the format refinfer expects: re-download or re-convert it; "
                    "python -m refinfer inspect FILE shows what it holds")

    def __init__(self, message: str, *, file=None, tensor=None, offset=None, hint=None):
        where = []
        if file is not None:
            where.append(f"file {str(file)!r}")
        if tensor is not None:
            where.append(f"tensor {tensor!r}")
        if offset is not None:
            where.append(f"offset {offset}")
        full = f"{', '.join(where)}: {message}" if where else message
        super().__init__(full, hint=hint)
        self.file, self.tensor, self.offset = file, tensor, offset


class UnsupportedError(RefinferError):
    """A valid input that refinfer does not implement (a block type, an architecture)."""

    default_hint = "python -m refinfer inspect FILE shows the file's types; README.md lists what refinfer implements"


class ShapeError(RefinferError):
    """An array or tensor has a shape that does not fit (e.g. row length not a multiple of the block size)."""

    default_hint = "check the shape against the block size of the type (refinfer.quant.get_type(name).block_size)"


class NonFiniteError(RefinferError):
    """Quantization input contains NaN or infinity."""

    default_hint = "find where the non-finite values come from (a diverged training run, an overflow in conversion)"


class CheckpointWarning(UserWarning):
    """A checkpoint that loads, but whose data contradicts its config or carries a known producer bug
    (warnings.warn category; the message names the tensor and the evidence)."""
