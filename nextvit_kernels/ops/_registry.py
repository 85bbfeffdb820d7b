"""The one place where fused ops become ``torch.library`` custom ops.

Registering the Triton launchers as custom ops (``nextvit::<name>``) with a
fake implementation lets ``torch.compile(fullgraph=True)`` trace through them
and keeps CUDA graph capture working (launchers only allocate through the
caching allocator and never synchronize).
"""
import torch

NAMESPACE = "nextvit"
OPS = {}


def register(name: str, fake):
    """Decorator: turns a type-annotated launcher into ``torch.ops.nextvit.<name>``.

    ``fake`` takes the launcher's arguments and returns an empty output of the
    right shape, dtype and memory format (see ``_common.fake_output``).
    """

    def deco(fn):
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=())(fn)
        op.register_fake(fake)
        OPS[name] = op
        return op

    return deco
