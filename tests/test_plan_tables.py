"""The tables Python and the C library share, written once in ``nextvit_kernels/plan.py``, against
the constants of the C headers and sources that read them (op ids, dtype ids, shape keys, the
model file's plan table, layouts, status codes): a change on one side only fails here."""
import re
from pathlib import Path

import pytest

from nextvit_kernels import _library, plan, runtime

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def _text(rel):
    return (CSRC / rel).read_text()


def _enum(text, prefix):
    """{NAME: value} of the ``NAME = value`` enumerators starting with ``prefix``."""
    return {m.group(1): int(m.group(2)) for m in re.finditer(rf"\b({prefix}\w*)\s*=\s*(\d+)", text)}


def _define(text, name):
    m = re.search(rf"#define\s+{name}\s+(0x[0-9A-Fa-f]+|\d+)", text)
    assert m, f"no #define {name}"
    return int(m.group(1), 0)


def test_op_ids():
    want = {f"NVK_OP_{op.upper()}": i for op, i in plan.OP_ID.items()}
    assert _enum(_text("src/nvk_table.h"), "NVK_OP_") == want
    assert _enum(_text("src/nvk_table.h"), "NVK_NUM_OPS") == {"NVK_NUM_OPS": len(plan.OPS)}


def test_dtype_ids_layouts_and_status_codes():
    header = _text("include/nextvit_kernels.h")
    assert _enum(header, "NVK_F") | _enum(header, "NVK_BF") == {
        {"fp32": "NVK_F32", "fp16": "NVK_F16", "bf16": "NVK_BF16"}[n]: i for n, i in plan.DTYPE_ID.items()}
    assert _enum(header, "NVK_N") == {"NVK_NCHW": runtime.NCHW, "NVK_NHWC": runtime.NHWC}
    status = {("NVK_OK" if name == "OK" else name): code for code, name in _library.STATUS.items()}
    assert _enum(header, "NVK_OK") | _enum(header, "NVK_ERR_") == status


def test_shape_key_and_kernel_table_sizes():
    table = _text("src/nvk_table.h")
    assert _define(table, "NVK_KEY_LEN") == plan.KEY_LEN >= max(len(k) for k in plan.KEY_NAMES.values())
    assert _define(table, "NVK_CONST_LEN") == plan.CONST_LEN
    assert re.search(r"int kernels\[(\d+)\]", table).group(1) == str(plan.MAX_KERNELS)


def test_model_file_table_layout():
    src, header = _text("src/nvk_model.c"), _text("include/nextvit_kernels.h")
    assert _define(src, "PLAN_MAGIC") == plan.MAGIC
    assert _define(src, "FORMAT_VERSION") == plan.FORMAT_VERSION
    assert _define(header, "NVK_MODEL_ABI_VERSION") == plan.ABI_VERSION
    for name in ("HEAD_LEN", "STEP_LEN", "HEADREC_LEN", "NORM_LEN", "TENSOR_LEN", "FROM_BRANCH", "TO_BRANCH",
                 "X2_BRANCH"):
        assert _define(src, name) == getattr(plan, name), name


def test_the_check_can_fail():
    with pytest.raises(AssertionError):
        _define("#define HEAD_LEN 16\n", "STEP_LEN")
    assert _enum("enum { NVK_OP_A = 0, NVK_OP_B = 2 };", "NVK_OP_") != {"NVK_OP_A": 0, "NVK_OP_B": 1}
