"""The model file of the whole-model C runtime: one safetensors file holding a NextViT's
BatchNorm-folded weights in one dtype, in plan order, and its plan.

    save_runtime(model, "nextvit_s.nvk", dtype=torch.float16)      # or: python -m nextvit_kernels.aot --export ...
    plan, meta = load_plan("nextvit_s.nvk")                        # the same plan.Plan back, in Python

Anyone can inspect a file with the ``safetensors`` package: the tensors are named
``steps.<i>.<role>`` (``w``, ``b``; ``conv_w``, ``conv_b``, ``proj_w``; ``fc1_w`` ...), ``head.w``,
``head.b`` and ``stage_norms.<s>.scale`` / ``.shift``; the metadata holds ``format``,
``format_version``, ``abi_version``, ``variant``, ``dtype`` and ``plan`` (JSON: every step's op,
shape key, keyword arguments, tensors and dataflow flags; the head; the stage norms).

The C library does not parse JSON: the first tensor of the data, ``__nvk_plan__`` (int64, at
offset 0), is the same plan as a fixed-layout table, which ``csrc/src/nvk_model.c`` documents and
reads. Both are written here from one walk of the plan; ``load_plan`` checks that they agree.
"""
import json
import os
import struct
from typing import Tuple

import torch

from . import config, fused
from .plan import (ABI_VERSION, DTYPE_NAMES, DTYPES, FORMAT_VERSION, FROM_BRANCH, HEAD_LEN,
                   HEADREC_LEN, KEY_LEN, KEY_NAMES, MAGIC, NORM_LEN, OP_ID, ROLES, STEP_LEN, TENSOR_LEN,
                   TO_BRANCH, TORCH_DTYPE_ID, X2_BRANCH, Plan, Step, step_keys)

FORMAT = "nextvit_kernels.model"
PLAN_TENSOR = "__nvk_plan__"
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _key_list(op: str, key: dict) -> list:
    """The step's key as the table stores it: the op's C key without the stem's layout flag."""
    return [int(key[n]) for n in KEY_NAMES[op] if n != "nchw"]


def _records(plan: Plan):
    """(named tensors in plan order, JSON plan, int64 table) of ``plan``."""
    named, steps_json, step_rows = [], [], []
    for i, (s, (op, key)) in enumerate(zip(plan.steps, step_keys(plan))):
        names = [f"steps.{i}.{r}" for r in ROLES[op]]
        t0 = len(named)
        named += list(zip(names, s.tensors))
        flags = FROM_BRANCH * s.from_branch + TO_BRANCH * s.to_branch + X2_BRANCH * s.x2_branch
        kl = _key_list(op, key)
        step_rows.append([OP_ID[op], flags, s.stage_end, t0, len(names)] + kl + [0] * (KEY_LEN - len(kl)) + [0])
        steps_json.append(dict(op=op, key={n: v for n, v in key.items() if n != "nchw"}, kwargs=dict(s.kwargs),
                               tensors=names, from_branch=s.from_branch, to_branch=s.to_branch,
                               x2_branch=s.x2_branch, stage_end=s.stage_end))
    head_json, head_row = None, [-1] * HEADREC_LEN
    if plan.head is not None:
        w, b = plan.head
        head_row = [w.shape[1], w.shape[0], len(named), len(named) + 1]
        named += [("head.w", w), ("head.b", b)]
        head_json = dict(c=w.shape[1], n_classes=w.shape[0], tensors=["head.w", "head.b"])
    norms_json, norm_rows = None, []
    if plan.extra_norms is not None:
        norms_json = []
        for si, (scale, shift) in enumerate(plan.extra_norms):
            names = [f"stage_norms.{si}.scale", f"stage_norms.{si}.shift"]
            norm_rows.append([scale.numel(), len(named), len(named) + 1])
            named += [(names[0], scale.reshape(-1)), (names[1], shift.reshape(-1))]
            norms_json.append(dict(c=scale.numel(), tensors=names))
    n_classes = head_row[1] if plan.head is not None else 0
    head = [MAGIC, FORMAT_VERSION, ABI_VERSION, TORCH_DTYPE_ID[plan.dtype], len(plan.steps), len(named),
            int(plan.head is not None), n_classes, len(norm_rows), 3] + [0] * (HEAD_LEN - 10)
    plan_len = HEAD_LEN + STEP_LEN * len(step_rows) + HEADREC_LEN + NORM_LEN * len(norm_rows) + TENSOR_LEN * len(named)
    off = 8 * plan_len
    tensor_rows = []
    for _, t in named:
        nbytes = t.numel() * t.element_size()
        dims = list(t.shape) + [0] * (4 - t.dim())
        tensor_rows.append([off, nbytes, TORCH_DTYPE_ID[plan.dtype], t.dim()] + dims)
        off += nbytes
    table = head + [v for r in step_rows for v in r] + head_row + [v for r in norm_rows for v in r] + \
        [v for r in tensor_rows for v in r]
    assert len(table) == plan_len
    plan_json = dict(in_channels=3, steps=steps_json, head=head_json, stage_norms=norms_json)
    return named, plan_json, table


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def plan_bytes(plan: Plan, variant: str = "custom") -> bytes:
    """The model file of a folded ``plan`` (any device; written in the plan's dtype)."""
    named, plan_json, table = _records(plan)
    blob = struct.pack(f"<{len(table)}q", *[v - (1 << 64) if v >= 1 << 63 else v for v in table])
    header = {"__metadata__": {
        "format": FORMAT, "format_version": str(FORMAT_VERSION), "abi_version": str(ABI_VERSION),
        "variant": variant, "dtype": DTYPE_NAMES[plan.dtype], "plan": json.dumps(plan_json, sort_keys=True)}}
    header[PLAN_TENSOR] = dict(dtype="I64", shape=[len(table)], data_offsets=[0, len(blob)])
    parts, off = [blob], len(blob)
    for name, t in named:
        data = _bytes(t)
        header[name] = dict(dtype=_ST_DTYPES[plan.dtype], shape=list(t.shape), data_offsets=[off, off + len(data)])
        parts.append(data)
        off += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text + b"".join(parts)


def fold_for_runtime(model, dtype=torch.float16) -> Plan:
    """The model's folded plan on the CPU in ``dtype`` (the model itself is left as it was)."""
    if dtype not in TORCH_DTYPE_ID:
        raise ValueError(f"dtype must be one of float16, bfloat16, float32, got {dtype}")
    was_training = model.training
    try:
        return fused.fold(model.eval(), "cpu", dtype)
    finally:
        model.train(was_training)


def save_runtime(model, path: str, dtype=torch.float16) -> str:
    """Writes ``model`` (a NextViT; BatchNorms merged or not) as a model file for the C runtime
    (``nvk_model_load``, ``nextvit_kernels.runtime.Model``): folded weights in ``dtype`` and the
    plan. Returns ``path``."""
    return save_plan(fold_for_runtime(model, dtype), path, config.variant_of(model.depths))


def save_plan(plan: Plan, path: str, variant: str = "custom") -> str:
    """Writes a folded ``plan`` (``fold_for_runtime``) as a model file, atomically. Returns ``path``."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(plan_bytes(plan, variant))
    os.replace(tmp, path)
    return path


def load_plan(src, device="cpu") -> Tuple[Plan, dict]:
    """The plan of a model file (a path or its bytes) as a ``plan.Plan`` on ``device``, and the
    file's metadata. Raises ValueError when the file is not a model file, or when its table and its
    JSON plan disagree."""
    data = src if isinstance(src, (bytes, bytearray, memoryview)) else open(src, "rb").read()
    data = bytes(data)
    if len(data) < 8:
        raise ValueError("not a model file: shorter than a safetensors header")
    (hl,) = struct.unpack_from("<Q", data)
    if hl > len(data) - 8:
        raise ValueError("not a model file: truncated safetensors header")
    header = json.loads(data[8:8 + hl])
    meta = header.get("__metadata__", {})
    if meta.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file (metadata format {meta.get('format')!r})")
    if int(meta.get("format_version", -1)) != FORMAT_VERSION:
        raise ValueError(f"model file format version {meta.get('format_version')}; this package reads {FORMAT_VERSION}")
    dtype = DTYPES[meta["dtype"]]
    body = data[8 + hl:]

    def tensor(name):
        info = header[name]
        a, b = info["data_offsets"]
        t = torch.frombuffer(bytearray(body[a:b]), dtype=torch.uint8).view(dtype).reshape(info["shape"])
        return t.to(device)

    pj = json.loads(meta["plan"])
    steps = [Step(s["op"], [tensor(n) for n in s["tensors"]], dict(s["kwargs"]), s["from_branch"],
                        s["to_branch"], s["x2_branch"], s["stage_end"]) for s in pj["steps"]]
    head = tuple(tensor(n) for n in pj["head"]["tensors"]) if pj["head"] else None
    norms = [tuple(tensor(n) for n in s["tensors"]) for s in pj["stage_norms"]] if pj["stage_norms"] else None
    plan = Plan(torch.device(device), dtype, steps, head, norms)
    a, b = header[PLAN_TENSOR]["data_offsets"]
    stored = list(struct.unpack_from(f"<{(b - a) // 8}q", body, a))
    _, _, table = _records(plan)
    table = [v - (1 << 64) if v >= 1 << 63 else v for v in table]
    if stored != table:
        raise ValueError("the model file's __nvk_plan__ table does not match its JSON plan")
    return plan, meta


__all__ = ["save_runtime", "load_plan", "plan_bytes", "fold_for_runtime", "FORMAT_VERSION", "ABI_VERSION"]
