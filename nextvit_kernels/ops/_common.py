"""Shared input checking, dispatch and output allocation for the fused ops.

Every op follows the same contract (docs/design.md §4): activations are logically
[B, C, H, W] in any memory format, kernels work in channels_last, outputs are
channels_last, and ``impl`` picks the Triton kernel or the PyTorch reference.
"""
import contextlib
import os

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
IMPLS = ("auto", "triton", "reference")

# Tests set this so that any output element a kernel forgets to write is NaN
# instead of whatever the allocator handed back.
POISON_OUTPUTS = False


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if interpreter_enabled():  # every op module imports this one before its kernels can run
    from . import _interpreter

    _interpreter.patch()


def resolve_impl(op: str, impl: str, x: torch.Tensor) -> str:
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if x.is_cuda else "reference"
    if impl == "triton" and not x.is_cuda and not interpreter_enabled():
        raise ValueError(
            f"{op}: impl='triton' on a {x.device.type} tensor needs a CUDA tensor, "
            "or TRITON_INTERPRET=1 set before triton is imported"
        )
    return impl


def check_activation(op: str, name: str, x, channels=None, multiple_of=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{op}: {name} must be 4-D [B, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"{op}: {name} has dtype {x.dtype}; supported: float16, bfloat16, float32")
    if x.numel() == 0:
        raise ValueError(f"{op}: {name} is empty (shape {tuple(x.shape)})")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{op}: {name} has {x.shape[1]} channels, expected {channels}")
    if multiple_of is not None and x.shape[1] % multiple_of:
        raise ValueError(
            f"{op}: {name} has {x.shape[1]} channels, which is not a multiple of {multiple_of}"
        )


def check_param(op: str, name: str, t, like: torch.Tensor, shape) -> torch.Tensor:
    """Checks a weight or bias against the activation's device and dtype and an
    expected shape (None entries match anything); returns it contiguous."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != like.device:
        raise ValueError(f"{op}: {name} is on {t.device} but the input is on {like.device}")
    if t.dtype != like.dtype:
        raise ValueError(f"{op}: {name} has dtype {t.dtype} but the input has {like.dtype}")
    shape = tuple(shape)
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{op}: {name} has shape {list(t.shape)}, expected {want}")
    return t.contiguous()


def as_matrix(op: str, name: str, w, like: torch.Tensor, out_features=None, in_features=None):
    """A 1x1 conv or linear weight given as [O, I] or [O, I, 1, 1] -> contiguous [O, I]."""
    if isinstance(w, torch.Tensor) and w.dim() == 4:
        if tuple(w.shape[2:]) != (1, 1):
            raise ValueError(f"{op}: {name} has shape {list(w.shape)}; a 1x1 weight must be [O, I] or [O, I, 1, 1]")
        w = w.reshape(w.shape[0], w.shape[1])
    return check_param(op, name, w, like, (out_features, in_features))


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def new_output(like: torch.Tensor, b: int, c: int, h: int, w: int) -> torch.Tensor:
    out = torch.empty((b, c, h, w), device=like.device, dtype=like.dtype,
                      memory_format=torch.channels_last)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


def new_scratch(like: torch.Tensor, *shape: int) -> torch.Tensor:
    """A kernel-to-kernel intermediate. With POISON_OUTPUTS it is NaN and sits inside NaN
    guard bands, so reading an element nobody wrote, or past either end, shows up as NaN."""
    if not POISON_OUTPUTS:
        return torch.empty(shape, device=like.device, dtype=like.dtype)
    n = 1
    for d in shape:
        n *= d
    guard = 4096  # elements: keeps the view 16-byte aligned for every dtype
    buf = torch.full((n + 2 * guard,), float("nan"), device=like.device, dtype=like.dtype)
    return buf[guard:guard + n].view(shape)


def fake_output(like: torch.Tensor, b: int, c: int, h: int, w: int) -> torch.Tensor:
    """What a registered op's fake (meta) implementation returns."""
    return torch.empty((b, c, h, w), device=like.device, dtype=like.dtype,
                       memory_format=torch.channels_last)


def pooled_size(n: int, stride: int) -> int:
    """Output length of ceil-mode pooling with kernel == stride and no padding."""
    return -(-n // stride)


def channels_last_strides(b: int, c: int, h: int, w: int) -> tuple:
    """The strides of a dense channels_last [b, c, h, w] tensor (what ``to_channels_last``
    returns: the kernels only read a size-1 dimension at index 0, so its stride is moot)."""
    return (h * w * c, 1, w * c, c)


def on_device(x: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' device for the call
    (a no-op context where it already is, or on a CPU)."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()
