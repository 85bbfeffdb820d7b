"""The folded plan as data, and the tables every consumer of a plan shares.

A ``Plan`` is a NextViT with every BatchNorm folded away: a flat list of ``Step`` s (one fused op
call each, its weights in order) and the head, on one device in one dtype. ``fused.fold`` makes
one, ``fused.run`` / ``fused.Program`` run one, ``model_file`` writes one for the C runtime and
reads it back, ``aot`` walks one for the kernels to compile, ``onnx_export`` emits one.

The tables below are what the Python side and the C library must agree on: op ids, dtype ids,
each op's shape key, the model file's table layout. They are written once, here;
``tests/test_plan_tables.py`` reads the C headers and sources and checks every constant against
them. Nothing here imports Triton: folding for the C runtime never compiles a kernel.
"""
import importlib
import operator
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

Tensor = torch.Tensor

# ------------------------------------------------------------------ shared with the C library
OPS = ("conv_bn_relu", "patch_embed", "mhca", "mlp", "e_mhsa", "head")
OP_ID = {op: i for i, op in enumerate(OPS)}            # NVK_OP_* in csrc/src/nvk_table.h
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_ID = {"fp32": 0, "fp16": 1, "bf16": 2}           # nvk_dtype in nextvit_kernels.h
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
TORCH_DTYPE_ID = {DTYPES[name]: i for name, i in DTYPE_ID.items()}  # torch dtype -> nvk_dtype
# Each op's shape key: what the C library looks its kernels up by, in this order. nchw = 1: the
# stem's first conv reading contiguous NCHW images (the whole-model runtime takes either layout).
KEY_NAMES: Dict[str, Tuple[str, ...]] = {
    "conv_bn_relu": ("c_in", "c_out", "stride", "nchw"),
    "patch_embed": ("c_in", "c_out", "stride"),
    "mhca": ("c", "c_out", "residual"),
    "mlp": ("c1", "c2", "hidden", "c_out", "residual"),
    "e_mhsa": ("c", "c_out", "sr_ratio", "head_dim", "residual"),
    "head": ("c", "n_classes"),
}
KEY_LEN = 6           # NVK_KEY_LEN
CONST_LEN = 8         # NVK_CONST_LEN
MAX_KERNELS = 3       # kernels of one op call (E-MHSA split: kv, per-head attention, projection)

# The model file's plan table (int64 records; csrc/src/nvk_model.c reads it).
MAGIC = 0x314E414C504B564E  # b"NVKPLAN1" little-endian
FORMAT_VERSION = 1
ABI_VERSION = 1       # NVK_MODEL_ABI_VERSION in nextvit_kernels.h
HEAD_LEN, STEP_LEN, HEADREC_LEN, NORM_LEN, TENSOR_LEN = 16, 12, 4, 3, 8
FROM_BRANCH, TO_BRANCH, X2_BRANCH = 1, 2, 4
# the tensors of each op's step, in Step.tensors order
ROLES = {"conv_bn_relu": ("w", "b"), "patch_embed": ("w", "b"), "mhca": ("conv_w", "conv_b", "proj_w"),
         "mlp": ("fc1_w", "fc1_b", "fc2_w", "fc2_b"),
         "e_mhsa": ("q_w", "q_b", "k_w", "k_b", "v_w", "v_b", "proj_w", "proj_b")}


# ------------------------------------------------------------------ the plan
@dataclass
class Step:
    """One fused op call: ``op`` names a function of ``nextvit_kernels.ops``,
    ``tensors`` are its weight arguments in order, ``kwargs`` its keyword
    arguments. In an NTB the MHCA branch (projection, MHCA) reads and writes a
    second tensor, which the concat-MLP then takes as ``x2``."""
    op: str
    tensors: List[Tensor]
    kwargs: dict = field(default_factory=dict)
    from_branch: bool = False  # input is the branch tensor instead of the main one
    to_branch: bool = False    # output becomes the branch tensor
    x2_branch: bool = False    # the branch tensor is passed as x2 (never concatenated)
    stage_end: int = -1        # index of the stage this step ends, else -1


@dataclass
class Plan:
    """The folded weights of one model on one device in one dtype, and what they were folded from
    (``source``, ``key``: see ``is_current``). Data only: the programs bound from a plan, its CUDA
    graphs and its C runtime belong to the engine that runs it."""
    device: torch.device
    dtype: torch.dtype
    steps: List[Step]
    head: Optional[Tuple[Tensor, Tensor]]
    extra_norms: Optional[List[Tuple[Tensor, Tensor]]] = None
    source: List[Tensor] = field(default_factory=list)  # the model tensors it was folded from
    key: tuple = ()

    def is_current(self) -> bool:
        return self.key == weights_key(self.source)

    def launches(self, batch: int = 1, height: int = 224, width: int = 224) -> int:
        """Kernel launches of one forward at this input size: one per op, two for E-MHSA
        (K/V pooling, attention; three when wider than 256 outputs), for an MLP wider than
        128 outputs and for an MHCA on few pixels or of a width other than a power of two up
        to 256 (their split modes, see the op modules), one for the head."""
        sizes, _ = spatial_sizes(self, height, width)
        return sum(_kernels(s, self.dtype, batch * h * w) for s, (h, w) in zip(self.steps, sizes)) + 1


def spatial_sizes(plan: Plan, height: int, width: int):
    """The (H, W) each step's input has for an image of height x width, and the head's."""
    h, w = height, width
    sizes = []
    for s in plan.steps:
        sizes.append((h, w))
        st = s.kwargs.get("stride", 1)
        if s.op == "conv_bn_relu":  # 3x3, padding 1
            h, w = (h - 1) // st + 1, (w - 1) // st + 1
        elif s.op == "patch_embed" and not s.to_branch:  # ceil-mode pooling
            h, w = -(-h // st), -(-w // st)
    return sizes, (h, w)


def _op_config(op: str):
    # The split decisions live with each op's kernels (which import Triton): imported only when
    # launches are counted, never on the way to the C runtime.
    return importlib.import_module(f"{__package__}.ops.{op}")._config


def _kernels(step: Step, dtype: torch.dtype, pixels: int) -> int:
    if step.op == "e_mhsa":
        qw, _, _, _, _, _, pw, _ = step.tensors
        hd = step.kwargs.get("head_dim", 32)
        cfg = _op_config("e_mhsa")(1, qw.shape[0], pw.shape[0], 1, hd, step.kwargs["sr_ratio"])
        return 3 if cfg["split"] else 2
    if step.op == "mlp":
        w1, _, w2, _ = step.tensors
        cfg = _op_config("mlp")(w1.shape[1], 0, w1.shape[0], w2.shape[0], dtype)
        return 2 if cfg["split"] else 1
    if step.op == "mhca":
        cw, _, pw = step.tensors
        esize = torch.empty((), dtype=dtype).element_size()
        cfg = _op_config("mhca")(cw.shape[0], pw.shape[0], esize, pixels)
        return 2 if cfg["split"] else 1
    return 1


def step_keys(plan: Plan) -> List[Tuple[str, dict]]:
    """The C table's shape key of each step of ``plan`` (the stem conv's with an NHWC input):
    what the C library looks a step's kernels up by, and what a model file records."""
    branch_c, cur_c, out = None, 3, []
    for s in plan.steps:
        t = s.tensors
        if s.op in ("conv_bn_relu", "patch_embed"):
            key = dict(c_in=t[0].shape[1], c_out=t[0].shape[0], stride=s.kwargs["stride"])
            if s.op == "conv_bn_relu":
                key["nchw"] = 0
            if s.to_branch:
                branch_c = key["c_out"]
            else:
                cur_c = key["c_out"]
        elif s.op == "mhca":
            key = dict(c=t[0].shape[0], c_out=t[2].shape[0], residual=int(s.kwargs.get("residual", True)))
        elif s.op == "mlp":
            c2 = branch_c if s.x2_branch else 0
            key = dict(c1=cur_c, c2=c2, hidden=t[0].shape[0], c_out=t[2].shape[0],
                       residual=int(s.kwargs.get("residual", True)))
            assert t[0].shape[1] == cur_c + c2
            cur_c = key["c_out"]
        elif s.op == "e_mhsa":
            key = dict(c=t[0].shape[0], c_out=t[6].shape[0], sr_ratio=s.kwargs["sr_ratio"],
                       head_dim=s.kwargs.get("head_dim", 32), residual=int(s.kwargs.get("residual", True)))
        else:
            raise ValueError(f"unknown op {s.op}")
        out.append((s.op, key))
    return out


# ------------------------------------------------------------------ staleness
def model_tensors(model: torch.nn.Module) -> List[Tensor]:
    """What a folded plan is computed from: parameters and BatchNorm statistics
    (num_batches_tracked counts training steps and folds into nothing)."""
    return list(model.parameters()) + [b for n, b in model.named_buffers() if not n.endswith("num_batches_tracked")]


_version = operator.attrgetter("_version")


def weights_key(tensors: List[Tensor]) -> tuple:
    """Changes whenever one of ``tensors`` gets new storage (``.to()``, ``.half()``,
    ``.data =``) or is modified in place (optimizer steps, ``load_state_dict``, an EMA
    update): version counters only grow, so their sum grows with any in-place write.
    Two passes in C over the tensors (~60 ns a tensor), no Python per tensor."""
    if torch.compiler.is_compiling():
        return ()  # dynamo cannot trace the C passes; the next eager call folds once more
    return sum(map(_version, tensors)), sum(map(Tensor.data_ptr, tensors))
