"""The C library's launchers on the CPU (CI): every nvk_* op entry point through the CPU stand-in of
the CUDA driver (``nextvit_kernels.testing.cpu_driver``), each launch running the Triton kernel it
names under the interpreter, against the op module's float64 reference on the same inputs.

The cases are the library's own shape-class table (the manifest it embeds), so a class added
later is tested without editing this file: for each (op, shape key, spatial probe range) the
smallest input whose probe (MHCA pixels B*H*W, E-MHSA key tokens H*W // sr^2, head H*W) falls in
the range, odd H and W, batch 1 or 2 (``_batch``), in the dtypes of ``_runs``: fp32 for
every class, fp16 for every key and mode (both modes of every split op), bf16 for the head;
and in fp32 also the smallest input at the top of each bounded range (``_tops``).

Each call must launch exactly the kernels of the class the table holds for that input (a wrong
probe or key in the C lookup picks another class or none), write every output element within
``assert_close``'s tolerance (outputs start as NaN), and refuse nothing. The ops with a workspace
run through the raw entry point with exactly the reported ``*_workspace_size`` bytes, NaN-filled,
between guard bytes the stand-in does not know (an access there is refused before it happens)
that must be unchanged afterwards; the cheapest fp16 case of each of their modes also runs
through ``nextvit_kernels.clib`` (its workspace sizing), the other ops always do.

``test_entry_point_refuses_bad_arguments`` gives each entry point, with arguments built from the
public header's prototype, every argument it can get wrong (NULL, misaligned and unknown pointers,
sizes of zero or below, an unknown dtype, channel counts no class holds): each must return its
status with a message naming the op and the argument, and launch, write and read nothing.
tests/test_clib_sanitizers.py runs this module again against a library built with ASan + UBSan.

Run time (2 cores, quiet): ~110 s, 70 of them the fused MHCA classes of C = 768 and 384 (every
program walks all heads for 4096+ pixels under the interpreter)."""
import dataclasses
import re

import pytest
import torch
from triton.runtime import interpreter

from nextvit_kernels import clib, ops, testing
from _util import assert_close, cpu_driver_library, header_prototypes, interpreted, rand_like_dtype, record_launches

LIBRARY, MANIFEST = cpu_driver_library()
pytestmark = interpreted()
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WORKSPACE_OPS = ("mhca", "mlp", "e_mhsa")
SPLIT_OPS = WORKSPACE_OPS  # ops whose classes run as one kernel or split into several
GUARD = 256  # guard bytes on each side of a workspace; keeps it 16-byte aligned


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    dtype: str
    key: tuple  # the shape key, in manifest["key_names"][op] order
    batch: int
    h: int
    w: int

    @property
    def k(self):
        return dict(zip(MANIFEST["key_names"][self.op], self.key))

    @property
    def probe(self):
        if self.op == "mhca":
            return self.batch * self.h * self.w
        if self.op == "e_mhsa":
            return self.h * self.w // self.k["sr_ratio"] ** 2
        if self.op == "head":
            return self.h * self.w
        return None

    def __str__(self):
        return f"{self.op}-{self.dtype}-{','.join(map(str, self.key))}-b{self.batch}-{self.h}x{self.w}"


def _hw(lo, hi):
    """The smallest H < W <= 4H, both odd, H >= 3 (every conv tap meets a border; H != W: a swapped
    height and width show) with lo <= H*W <= hi (hi < 0: open); where no odd pair fits (an exact
    even probe), the smallest 2 <= H <= W <= 4H; else None."""
    def smallest(h_from, step, w_min, parity):
        best = None
        for h in range(h_from, 256, step):
            w = max(w_min(h), -(-lo // h))
            w += parity and 1 - w % 2
            if w <= 4 * h and (hi < 0 or h * w <= hi) and (best is None or h * w < best[0] * best[1]):
                best = (h, w)
        return best
    return smallest(3, 2, lambda h: h + 2, True) or smallest(2, 1, lambda h: h, False)


def _spatial(row, batch, top=False):
    """(H, W) of the smallest input of ``batch`` images whose probe falls in the class's range
    (``top``: the smallest whose probe is the range's last value)."""
    lo, hi = row["probe_lo"], row["probe_hi"]
    if top:
        lo = hi
    if row["op"] == "mhca":  # the probe counts the pixels of the whole batch
        return _hw(-(-lo // batch), hi // batch if hi >= 0 else -1)
    if row["op"] == "e_mhsa":  # key tokens: H*W // r, the trailing H*W % r tokens dropped
        r = row["key"]["sr_ratio"] ** 2
        return _hw(lo * r, (hi + 1) * r - 1 if hi >= 0 else -1)
    if row["op"] == "head":
        return _hw(lo, hi)
    return 3, 5


def _tops(row):
    """Whether the class also runs at the top of its probe range (fp32, batch 1), so that both
    ends of every range are seen to pick it: for the per-image probes (cheap there) and MHCA's
    narrowest key (4095 pixels cost little only there)."""
    if row["dtype"] != "fp32" or row["probe_hi"] < 0:
        return False
    if row["op"] == "mhca":
        return row["key"]["c"] == min(r["key"]["c"] for r in MANIFEST["shape_classes"] if r["op"] == "mhca")
    return True


def _runs(row):
    """fp32: every class. fp16: the lowest probe class of every key and the cheapest class of every
    mode (op, kernel count), i.e. every key, mode and workspace layout; the other probe classes
    differ from those only in the kernels' tiles, already run in fp32, and cost the most (up to a
    minute for the fused MHCA of C = 768). bf16: the head, the only op without a dot (the
    interpreter mishandles bf16 dots, docs/design.md §6)."""
    if row["dtype"] == "bf16":
        return row["op"] == "head"
    if row["dtype"] == "fp32":
        return True
    rows = MANIFEST["shape_classes"]
    same_key = [r for r in rows if (r["op"], r["dtype"], r["key_tuple"]) == (row["op"], row["dtype"], row["key_tuple"])]
    same_mode = [r for r in rows if (r["op"], r["dtype"], len(r["kernels"])) == (row["op"], row["dtype"], len(row["kernels"]))]
    return (row["probe_lo"] == min(r["probe_lo"] for r in same_key)
            or row is min(same_mode, key=lambda r: (r["probe_lo"], r["key_tuple"])))


def _batch(row, rows):
    """1 or 2, so that every op and mode runs both where it costs little: alternating over the keys
    for the ops whose probe is none or counts the whole batch (MHCA's pixels: a batch-2 input is
    no larger there, and a probe that forgot the batch picks another class); for the per-image
    probes, 2 for the lowest probe class of each key (the smallest inputs), else 1."""
    group = [r for r in rows if (r["op"], r["dtype"]) == (row["op"], row["dtype"])]
    if MANIFEST["probe"][row["op"]] in (None, "pixels"):
        keys = list(dict.fromkeys(tuple(r["key_tuple"]) for r in group))
        return 1 + keys.index(tuple(row["key_tuple"])) % 2
    return 2 if row["probe_lo"] == min(r["probe_lo"] for r in group if r["key_tuple"] == row["key_tuple"]) else 1


def _per_op(row):
    """The classes an nvk_* entry point can launch: all but the stem conv's NCHW-input variant, which
    only the whole-model runtime uses (tests/test_runtime.py runs it through NCHW images)."""
    return not (row["op"] == "conv_bn_relu" and row["key"].get("nchw"))


def _plan():
    cases = []
    rows = [r for r in MANIFEST["shape_classes"] if _per_op(r)]
    for row in rows:
        if not _runs(row):
            continue
        batch = _batch(row, rows)
        for b, top in [(batch, False)] + [(1, True)] * _tops(row):
            hw = _spatial(row, b, top)
            assert hw is not None, f"no H x W fits the probe range of {row}"
            cases.append(Case(row["op"], row["dtype"], tuple(row["key_tuple"]), b, *hw))
    cases += _multi_program_cases(rows)
    return cases


def _multi_program_cases(rows):
    """The 3x5 inputs of the ops without a probe fit one program along the pixels: a grid one short
    there would launch nothing and show, but one short of several would not. So each mode of those
    ops also runs, in fp32, its narrowest key on an input of more than two tiles of pixels."""
    cases = []
    for op in ("conv_bn_relu", "patch_embed", "mlp"):
        modes = {}
        for r in rows:
            if r["op"] == op and r["dtype"] == "fp32":
                modes.setdefault(len(r["kernels"]), []).append(r)
        for group in modes.values():
            row = min(group, key=lambda r: sum(r["key_tuple"]))
            tile = max(v for n, v in row["consts"].items() if n.endswith("BLOCK_M"))
            stride = row["key"].get("stride", 1)
            cases.append(Case(op, "fp32", tuple(row["key_tuple"]), 1, *_hw((2 * tile + 1) * stride ** 2, -1)))
    return cases


CASES = _plan()
KERNELS = {k["id"]: k for k in MANIFEST["kernels"]}


def _lookup(case):
    """The table's class for the case's input, as the C library looks it up (the first row with
    the op, dtype and key whose probe range holds the probe)."""
    for row in MANIFEST["shape_classes"]:
        if (row["op"], row["dtype"], tuple(row["key_tuple"])) != (case.op, case.dtype, case.key):
            continue
        p, lo, hi = case.probe, row["probe_lo"], row["probe_hi"]
        if p is None or (lo <= p and (hi < 0 or p <= hi)):
            return row
    raise AssertionError(f"{case}: no shape class holds this input")


def _class_id(row):
    return row["op"], tuple(row["key_tuple"]), row["probe_lo"], row["probe_hi"], len(row["kernels"])


# ----------------------------------------------------------------------------- inputs
def _act(case, c):
    x, x64 = rand_like_dtype(case.batch, c, case.h, case.w, dtype=DTYPES[case.dtype])
    return x.contiguous(memory_format=torch.channels_last), x64


def _weight(dtype, *shape):
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    return rand_like_dtype(*shape, dtype=dtype, scale=fan_in ** -0.5)


def _bias(dtype, n):
    return rand_like_dtype(n, dtype=dtype, scale=0.1)


def _inputs(case):
    """([(tensor, float64 copy)] in the C entry point's order (None: a NULL pointer), the clib /
    reference keyword arguments, output channels)."""
    dt, k = DTYPES[case.dtype], case.k
    if case.op in ("conv_bn_relu", "patch_embed"):
        ci, co = k["c_in"], k["c_out"]
        w = _weight(dt, co, ci, 3, 3) if case.op == "conv_bn_relu" else _weight(dt, co, ci)
        return [_act(case, ci), w, _bias(dt, co)], dict(stride=k["stride"]), co
    if case.op == "mhca":
        c = k["c"]
        return ([_act(case, c), _weight(dt, c, 32, 3, 3), _bias(dt, c), _weight(dt, k["c_out"], c)],
                dict(residual=bool(k["residual"])), k["c_out"])
    if case.op == "mlp":
        c1, c2, hid, co = k["c1"], k["c2"], k["hidden"], k["c_out"]
        return ([_act(case, c1), _act(case, c2) if c2 else (None, None), _weight(dt, hid, c1 + c2), _bias(dt, hid),
                 _weight(dt, co, hid), _bias(dt, co)], dict(residual=bool(k["residual"])), co)
    if case.op == "e_mhsa":
        c, co = k["c"], k["c_out"]
        qkv = [t for _ in range(3) for t in (_weight(dt, c, c), _bias(dt, c))]
        return ([_act(case, c), *qkv, _weight(dt, co, c), _bias(dt, co)],
                dict(sr_ratio=k["sr_ratio"], head_dim=k["head_dim"], residual=bool(k["residual"])), co)
    if case.op == "head":
        c, n = k["c"], k["n_classes"]
        return [_act(case, c), _weight(dt, n, c), _bias(dt, n)], {}, n
    raise AssertionError(f"op {case.op} of the library's table has no inputs here")


def _py_call(fn, case, tensors, kw):
    """``fn(*tensors, **kw)`` with the Python signatures' argument order: MLP's x2 is second in C,
    a keyword in ``clib.mlp`` and ``ops.mlp.reference``."""
    if case.op == "mlp":
        x, x2, *rest = tensors
        return fn(x, *rest, x2=x2, **kw)
    return fn(*tensors, **kw)


def _raw_call(drv, case, tensors, c_out):
    """(out, workspace reach, workspace size) of the raw C entry point given exactly the reported
    workspace, NaN-filled (a byte read before it is written poisons the output), between random
    guard bytes that are not registered with the stand-in and must come back unchanged."""
    lib = drv.library
    dt = clib._DT[DTYPES[case.dtype]]
    size = getattr(lib, f"{case.op}_workspace_size")(case.batch, case.h, case.w, *case.key, dt)
    buf = torch.randint(0, 256, (2 * GUARD + size,), dtype=torch.uint8)
    buf[GUARD:GUARD + size] = 0xFF  # NaN in fp32, fp16 and bf16
    before = buf.clone()
    ws = buf.data_ptr() + GUARD if size else 0
    assert ws % 16 == 0
    out = torch.full((case.batch, c_out, case.h, case.w), float("nan"), dtype=DTYPES[case.dtype])
    out = out.contiguous(memory_format=torch.channels_last)
    ptrs = [0 if t is None else t.data_ptr() for t in tensors]
    with drv.registered(*tensors, out, (ws, size) if size else None):
        status = getattr(lib, case.op)(*ptrs, out.data_ptr(), ws, case.batch, case.h, case.w, *case.key, dt, 0)
    assert status == 0, f"{case}: {clib._STATUS.get(status, status)}: {lib.last_error()}"
    assert torch.equal(buf[:GUARD], before[:GUARD]) and torch.equal(buf[GUARD + size:], before[GUARD + size:]), \
        f"{case}: the guard bytes around the {size}-byte workspace changed"
    return out, drv.reach(ws) if size else 0, size


# ----------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def stand_in():
    """The stand-in for the module, and every launch it runs (_util.record_launches)."""
    mp = pytest.MonkeyPatch()
    launched = record_launches(mp)
    # The interpreter's int32 overflow sanitizer doubles its time per op; no index of these tiny
    # shapes comes near 2**31, and a wrapped address would be refused by the stand-in's bounds check.
    options = interpreter.interpreter_builder.options
    if hasattr(options, "sanitize_overflow"):
        mp.setattr(interpreter.interpreter_builder, "options", dataclasses.replace(options, sanitize_overflow=False))
    try:
        with testing.cpu_driver(library=LIBRARY) as drv:
            yield drv, launched
    finally:
        mp.undo()


def _front_end_cases():
    """Per op with a workspace and per mode, its cheapest fp16 case, through nextvit_kernels.clib."""
    best = {}
    for case in CASES:
        if case.op in WORKSPACE_OPS and case.dtype == "fp16":
            mode = (case.op, len(_lookup(case)["kernels"]))
            size = (case.batch * case.h * case.w, case.key)
            if mode not in best or size < best[mode][0]:
                best[mode] = (size, case)
    return [c for _, c in best.values()]


def _call(case, via):
    # The fused MHCA of C >= 384 on 4096+ pixels: 20-60 s each under the interpreter (every
    # program walks all heads); the quick tier runs the narrower keys of the same mode.
    slow = case.op == "mhca" and case.batch * case.h * case.w * case.key[0] >= 1_500_000
    return pytest.param(case, via, id=f"{case}-{via}", marks=[pytest.mark.slow] if slow else [])


CALLS = ([_call(c, "raw" if c.op in WORKSPACE_OPS else "clib") for c in CASES]
         + [_call(c, "clib") for c in _front_end_cases()])


@pytest.mark.parametrize("case,via", CALLS)
def test_entry_point_matches_reference(stand_in, case, via):
    drv, launched = stand_in
    row = _lookup(case)
    pairs, kw, c_out = _inputs(case)
    tensors, t64 = [p[0] for p in pairs], [p[1] for p in pairs]
    drv.reset_counters()
    launched.clear()
    if via == "raw":
        out, reach, size = _raw_call(drv, case, tensors, c_out)
        if len(row["kernels"]) == 1:  # one kernel: nothing goes through the workspace
            assert reach == 0, f"{case}: {reach} bytes of the workspace touched by a one-kernel class"
        else:
            # Every part of the workspace is written up to its last byte and 256-byte aligned: the
            # kernels reach the end of the last part, so the reported size is that end rounded up
            # to the alignment, never a part's worth more (nor less: the guard would refuse it).
            assert 0 <= size - reach < 256, f"{case}: workspace of {size} bytes, the kernels reach {reach}"
    else:
        out = _py_call(getattr(clib, case.op), case, tensors, kw)
    assert drv.errors == []
    # By image: variants that differ only in a divisibility hint the code never used compile to
    # the same bytes (kv_kernel with sr_ratio 2 and 4), and the stand-in runs either for them.
    want = [KERNELS[kid]["archs"]["sm_90"]["cubin_sha1"] for kid in row["kernels"]]  # an sm_90 device
    assert [x["sha1"] for x in launched] == want, f"{case}: launched {launched}, the class is {row}"
    counters = drv.counters()
    assert (counters["launches"], counters["allocs"], counters["syncs"]) == (len(row["kernels"]), 0, 0), counters
    ref = _py_call(ops.module(case.op).reference, case, t64, kw)
    assert_close(out, ref, DTYPES[case.dtype], what=str(case))


def test_cases_cover_the_shape_class_table():
    """Every (op, shape key, probe class, kernel count) of the library's table is some case's class,
    and both modes of every split op run in fp32 and fp16."""
    table = {_class_id(row) for row in MANIFEST["shape_classes"] if _per_op(row)}
    covered = {_class_id(_lookup(case)) for case in CASES}
    assert covered == table, f"not covered: {sorted(table - covered)}"
    modes = {(row["op"], row["dtype"], len(row["kernels"])) for row in MANIFEST["shape_classes"]}
    run = {(case.op, case.dtype, len(_lookup(case)["kernels"])) for case in CASES}
    need = {m for m in modes if m[0] in SPLIT_OPS and m[1] in ("fp32", "fp16")}
    assert need <= run, f"split-op modes not run: {sorted(need - run)}"
    assert {case.batch for case in CASES} == {1, 2}
    print(f"{len(table)} shape classes (op, key, probe class, kernels) of {len(MANIFEST['shape_classes'])} table "
          f"rows covered by {len(CASES)} cases")


# ----------------------------------------------------------------------------- bad arguments
CHANNEL_KEYS = ("c", "c_in", "c1", "c_out", "n_classes")  # shifted together: consistent, and no class holds it


def _prototype(op):
    """nvk_<op>'s parameters as (name, is_pointer), read from the public header."""
    return [(re.findall(r"\w+", p)[-1], "*" in p) for p in header_prototypes()[f"nvk_{op}"][1]]


def _refusal_cases():
    """Per op, its cheapest fp32 case in the mode with the most kernels (a workspace to check)."""
    best = {}
    for case in CASES:
        if case.dtype == "fp32":
            rank = (-len(_lookup(case)["kernels"]), case.batch * case.h * case.w, case.key)
            if case.op not in best or rank < best[case.op][0]:
                best[case.op] = (rank, case)
    return [c for _, c in best.values()]


def _bad_calls(case, names, values):
    """(what, changed values, status name, message fragment) of every argument a call can get wrong."""
    k = case.k
    out = []
    for i, (name, ptr) in enumerate(names):
        if not ptr or name == "stream" or values[i] == 0:
            continue  # a NULL x2 (no concat) or workspace (one kernel) is a valid call
        out.append((f"{name}=NULL", {name: 0}, "NVK_ERR_INVALID", f"{name} is NULL"))
        out.append((f"{name} misaligned", {name: values[i] + 8}, "NVK_ERR_INVALID", f"{name} = 0x"))
        out.append((f"{name} unknown", {name: 1 << 40}, "NVK_ERR_INVALID", f"{name} = 0x"))
    for name in ("batch", "h", "w_"):
        for v in (0, -3):
            out.append((f"{name}={v}", {name: v}, "NVK_ERR_INVALID", f"{name} must be positive, got {v}"))
    out.append(("dtype 3", {"dt": 3}, "NVK_ERR_INVALID", "unknown dtype 3"))
    held = {tuple(r["key_tuple"]) for r in MANIFEST["shape_classes"] if (r["op"], r["dtype"]) == (case.op, case.dtype)}
    step = k.get("head_dim", 32)  # keeps every channel count a multiple of the head size
    shift = next(s for s in range(step, 1 << 16, step)
                 if tuple(v + s * (n in CHANNEL_KEYS) for n, v in k.items()) not in held)
    shifted = {n: k[n] + shift for n in CHANNEL_KEYS if n in k}
    out.append(("no class", shifted, "NVK_ERR_UNSUPPORTED", "no kernel was compiled ahead of time"))
    return out


REFUSALS = _refusal_cases()


@pytest.mark.parametrize("case", REFUSALS, ids=[c.op for c in REFUSALS])
def test_entry_point_refuses_bad_arguments(stand_in, case):
    """Each argument an nvk_* call can get wrong (a NULL, misaligned or unknown pointer, a size of
    zero or below, an unknown dtype, a shape no class holds) gives its error code and a message
    naming the op and the argument, and launches nothing, writes nothing, reads no buffer."""
    drv, launched = stand_in
    pairs, kw, _c_out = _inputs(case)
    tensors = [p[0] for p in pairs]
    ref = _py_call(ops.module(case.op).reference, case, [p[1] for p in pairs], kw)
    lib = drv.library
    dt = clib._DT[DTYPES[case.dtype]]
    names = _prototype(case.op)
    ws_size = getattr(lib, f"{case.op}_workspace_size")(case.batch, case.h, case.w, *case.key, dt) \
        if case.op in WORKSPACE_OPS else 0
    ws = torch.full((max(ws_size, 16),), 0x5A, dtype=torch.uint8)
    out = torch.full(ref.shape, float("nan"), dtype=DTYPES[case.dtype])
    out = out.contiguous(memory_format=torch.channels_last) if out.dim() == 4 else out
    pointers = iter([0 if t is None else t.data_ptr() for t in tensors])
    given = dict(case.k, batch=case.batch, h=case.h, w_=case.w, dt=dt, stream=0, out=out.data_ptr(),
                 workspace=ws.data_ptr() if ws_size else 0)
    values = [given[n] if n in given else next(pointers) for n, _ in names]
    assert next(pointers, None) is None, f"{case.op}: the header's pointers are not _inputs' tensors"
    inputs = [t for t in tensors if t is not None]
    before, ws_before = [t.clone() for t in inputs], ws.clone()
    with drv.registered(*tensors, out, ws):
        for what, change, status, fragment in _bad_calls(case, names, values):
            args = [change.get(n, v) for (n, _), v in zip(names, values)]
            drv.reset_counters()
            launched.clear()
            got = getattr(lib, case.op)(*args)
            message = lib.last_error()
            assert clib._STATUS.get(got, got) == status, f"{case} {what}: {clib._STATUS.get(got, got)}: {message}"
            assert message.startswith(f"nvk_{case.op}: ") and fragment in message, f"{case} {what}: {message}"
            assert launched == [] and drv.counters()["launches"] == 0, f"{case} {what}: launched {launched}"
            assert drv.errors == []
        ok = getattr(lib, case.op)(*values)  # the unchanged call still runs
    assert clib._STATUS.get(ok, ok) == "OK", lib.last_error()
    assert torch.equal(ws[ws_size:], ws_before[ws_size:])  # all of it where the call needs none
    assert all(torch.equal(a, b) for a, b in zip(inputs, before)), "an input changed"
    assert_close(out, ref, DTYPES[case.dtype], what=str(case))
