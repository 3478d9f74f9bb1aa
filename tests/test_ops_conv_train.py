"""The fused training conv and its statistics against float64 references: the statistics conv
(``conv_train``: prologue, residual, layouts, TMA path, NaN, cancellation, the batch split, empty
batches), the batch-statistics partials and their merge, and the registration of every fused
training op (``torch.library.opcheck``). The BN + ReLU ops: tests/test_ops_bn_train.py.

Every result is judged against PyTorch's own error in the same dtype (``utils.assert_close``).
Statistics are those of the conv output *as stored*, so they are checked against the float64
statistics of the kernel's own output (``utils.check_stats``). On a CPU machine the Triton kernels
run through Triton's interpreter (conftest.py sets TRITON_INTERPRET=1), so shapes stay tiny.
"""
import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import resnet_fused.ops.bn_train  # noqa: F401 - registers the resnet_fused::bn_relu_* custom ops
import resnet_fused.ops.conv_bn_train  # noqa: F401 - registers resnet_fused::conv_train
from resnet_fused.ops.batch_stats import StatsPartials, channel_stats_partials, finalize, merge_partials
from resnet_fused.ops.conv_bn_train import conv_train_reference
from utils import DEVICE, DIMS, INTERPRET, assert_close, check_stats, make_bn_case, rel_err, vec_stats

bs = importlib.import_module("resnet_fused.ops.batch_stats")
cba = importlib.import_module("resnet_fused.ops.conv_bias_act")  # the module, not the function
ops = torch.ops.resnet_fused

pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET, reason="Triton on CPU needs TRITON_INTERPRET=1")

CL = torch.channels_last
NCHW = torch.contiguous_format
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# =================================================================================== conv_train
# (N, Cin, H, W, Cout, kernel, stride, padding, dilation)
CONV_SHAPES = {
    "3x3_5to7_flatk": (2, 5, 7, 7, 7, 3, 1, 1, 1),  # odd channels, Cin < 8: FLAT_K
    "3x3_3to11_flatk": (2, 3, 6, 5, 11, 3, 1, 1, 1),
    "stem7x7s2_flatk": (1, 3, 12, 12, 8, 7, 2, 3, 1),  # the stem: Cin=3, 7x7 stride 2 pad 3
    "3x3s2_9to5": (1, 9, 9, 7, 5, 3, 2, 1, 1),  # Cin >= 8: the per-tap loop; batch 1
    "1x1s2_10to7": (2, 10, 9, 5, 7, 1, 2, 0, 1),
    "dil2_8to6": (1, 8, 9, 9, 6, 3, 1, 2, 2),
    # Cout 40 > the interpreter's 32-wide N tile, M = 162: several tile rows and columns, so
    # several programs write each statistics row's channels
    "tiles_8to40": (2, 8, 9, 9, 40, 3, 1, 1, 1),
}
# what goes with the conv: BN+ReLU prologue on its input, a residual in its epilogue
VARIANTS = {"plain": (False, False), "prologue": (True, False), "residual": (False, True), "both": (True, True)}


def make_conv_case(shape, dtype, prologue=False, residual=False, x_fmt=NCHW, res_fmt=NCHW, x_mean=0.0, x_std=1.0):
    """x, weight, (in_mean, in_scale, in_shift) or Nones, residual, and conv args (as lists)."""
    n, cin, h, w, cout, k, s, p, d = shape
    oh, ow = [(v + 2 * p - d * (k - 1) - 1) // s + 1 for v in (h, w)]
    x = (x_mean + x_std * torch.randn(n, cin, h, w, device=DEVICE)).to(dtype).contiguous(memory_format=x_fmt)
    wt = (torch.randn(cout, cin, k, k, device=DEVICE) / (cin * k * k) ** 0.5).to(dtype)
    pro = (None, None, None)
    if prologue:  # a batch BN of x: its mean, gamma * invstd and beta (float32 [Cin])
        mean, var = vec_stats(x)
        gamma = torch.rand(cin, device=DEVICE) + 0.5
        pro = (mean.float(), (gamma / (var + 1e-5).sqrt()).float(), 0.5 * torch.randn(cin, device=DEVICE))
    r = None
    if residual:
        r = torch.randn(n, cout, oh, ow, device=DEVICE).to(dtype).contiguous(memory_format=res_fmt)
    return x, wt, pro, r, dict(stride=[s, s], padding=[p, p], dilation=[d, d])


def run_conv_train(x, wt, pro, r, conv, channels_last=False, stats=True, out_dtype=None):
    return ops.conv_train(x, wt, *pro, r, conv["stride"], conv["padding"], conv["dilation"], channels_last, stats,
                          out_dtype or x.dtype)


def conv_refs(x, wt, pro, r, conv):
    """(float64 reference output, PyTorch's output in x's dtype)."""
    ref64 = conv_train_reference(x, wt, *pro, r, **conv, upcast=True)[0]
    same = conv_train_reference(x, wt, *pro, r, **conv)[0]
    return ref64, same


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
@pytest.mark.parametrize("shape", list(CONV_SHAPES.values()), ids=list(CONV_SHAPES))
def test_conv_train_fp32(shape, variant, poisoned_empty):
    x, wt, pro, r, conv = make_conv_case(shape, torch.float32, *VARIANTS[variant])
    y, count, anchor, offset, m2 = run_conv_train(x, wt, pro, r, conv)
    ref64, same = conv_refs(x, wt, pro, r, conv)
    assert y.dtype == torch.float32 and y.is_contiguous()
    assert torch.isfinite(ref64).all()
    assert_close(y, ref64, same, name="y")
    check_stats(y, count, anchor, offset, m2)
    # and the statistics are those of the true conv output, as closely as PyTorch's own fp32 gets them
    assert_close(anchor + offset, ref64.mean(dim=DIMS), same.mean(dim=DIMS), name="mean vs float64 conv")
    assert_close(m2 / count, ref64.var(dim=DIMS, unbiased=False), same.var(dim=DIMS, unbiased=False),
                 name="var vs float64 conv")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,variant", [("stem7x7s2_flatk", "both"), ("3x3s2_9to5", "both"),
                                           ("1x1s2_10to7", "prologue")], ids=["stem_both", "3x3s2_both", "1x1s2_pro"])
def test_conv_train_half(shape, variant, dtype, poisoned_empty):
    """fp16/bf16: y against PyTorch's same-dtype conv; statistics of y as stored (rounded to dtype)."""
    x, wt, pro, r, conv = make_conv_case(CONV_SHAPES[shape], dtype, *VARIANTS[variant])
    y, count, anchor, offset, m2 = run_conv_train(x, wt, pro, r, conv)
    ref64, same = conv_refs(x, wt, pro, r, conv)
    assert y.dtype == dtype == same.dtype
    assert_close(y, ref64, same, name="y")
    check_stats(y, count, anchor, offset, m2)  # the rounded values' statistics, to fp32 accuracy


def test_conv_train_out_dtype_float32_from_half(poisoned_empty):
    """``out_dtype`` decides y's dtype: an fp16 conv stored in fp32 (no fp16 rounding of y)."""
    x, wt, pro, r, conv = make_conv_case(CONV_SHAPES["3x3s2_9to5"], torch.float16, prologue=True)
    y, count, anchor, offset, m2 = run_conv_train(x, wt, pro, r, conv, out_dtype=torch.float32)
    assert y.dtype == torch.float32
    ref64, same = conv_refs(x, wt, pro, r, conv)
    assert_close(y, ref64, same, name="y", dtype=torch.float16)  # the fp16 operands bound the error
    check_stats(y, count, anchor, offset, m2)


@pytest.mark.parametrize("out_cl", [False, True], ids=["out_nchw", "out_cl"])
@pytest.mark.parametrize("x_fmt", [NCHW, CL], ids=["x_nchw", "x_cl"])
def test_conv_train_layouts(x_fmt, out_cl, poisoned_empty):
    """The ``channels_last`` flag alone picks y's layout, whatever x's and the residual's layouts."""
    res_fmt = NCHW if x_fmt == CL else CL
    x, wt, pro, r, conv = make_conv_case(CONV_SHAPES["3x3s2_9to5"], torch.float32, True, True, x_fmt, res_fmt)
    y, count, anchor, offset, m2 = run_conv_train(x, wt, pro, r, conv, channels_last=out_cl)
    want, other = (CL, NCHW) if out_cl else (NCHW, CL)
    assert y.is_contiguous(memory_format=want) and not y.is_contiguous(memory_format=other)
    ref64, same = conv_refs(x, wt, pro, r, conv)
    assert_close(y, ref64, same, name="y")
    check_stats(y, count, anchor, offset, m2)


# Tensor descriptors (the interpreter emulates TMA, zero-filling out of bounds): the prologue's
# BN + ReLU must not turn the zero fill of rows past M or channels past Cin into relu(shift) > 0.
# (N, Cin, H, W, Cout, kernel, stride, padding, dilation), layout, descriptors expected (x, weight)
TMA_TRAIN = {
    "1x1s1_cl_16to40": ((2, 16, 5, 7, 40, 1, 1, 0, 1), CL, (True, True)),
    "1x1s1_cl_24to20": ((2, 24, 5, 7, 20, 1, 1, 0, 1), CL, (True, False)),  # 2nd Cin block: 8 of 16 past Cin
    "3x3_nchw_16to20": ((1, 16, 7, 6, 20, 3, 1, 1, 1), NCHW, (False, True)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(TMA_TRAIN), ids=list(TMA_TRAIN))
def test_conv_train_tma_path(case, dtype, monkeypatch, poisoned_empty):
    shape, fmt, want = TMA_TRAIN[case]
    x, wt, (mean, scale, _), r, conv = make_conv_case(shape, dtype, True, True, fmt, fmt)
    pro = (mean, scale, torch.full_like(mean, 3.0))  # relu(bn(0)) = 3 - mean * scale > 0 mostly
    seen = []
    real = cba.tma_descriptors
    monkeypatch.setattr(cba, "tma_descriptors", lambda *a: seen.append(real(*a)) or seen[-1])
    y, count, anchor, offset, m2 = run_conv_train(x, wt, pro, r, conv, channels_last=fmt == CL)
    if INTERPRET:
        assert [tuple(d is not None for d in descs) for descs in seen] == [want]
    ref64, same = conv_refs(x, wt, pro, r, conv)
    assert_close(y, ref64, same, name="y")
    check_stats(y, count, anchor, offset, m2)
    monkeypatch.setattr(cba, "tma_descriptors", lambda *a: (None, None))
    pointer = run_conv_train(x, wt, pro, r, conv, channels_last=fmt == CL)
    if INTERPRET:  # the same values reach the same numpy dot
        for got, ptr in zip((y, count, anchor, offset, m2), pointer):
            assert torch.equal(got, ptr)


def test_conv_train_stats_off_same_output():
    """stats=False: empty statistics outputs, and y bit-identical to the stats=True run."""
    x, wt, pro, r, conv = make_conv_case(CONV_SHAPES["tiles_8to40"], torch.float32, True, True)
    y, *st = run_conv_train(x, wt, pro, r, conv, stats=False)
    assert all(t.shape == (0,) and t.dtype == torch.float32 for t in st)
    y_stats = run_conv_train(x, wt, pro, r, conv, stats=True)[0]
    assert torch.equal(y, y_stats)
    ref64, same = conv_refs(x, wt, pro, r, conv)
    assert_close(y, ref64, same, name="y")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("shape", ["3x3_5to7_flatk", "3x3s2_9to5"])
def test_conv_train_nan_propagates(shape):
    """A NaN input survives the prologue's ReLU (as torch.relu keeps it) and reaches the outputs
    whose window holds it, and from them every channel's statistics."""
    x, wt, pro, r, conv = make_conv_case(CONV_SHAPES[shape], torch.float32, prologue=True)
    x[0, 1, 2, 3] = float("nan")
    y, count, anchor, offset, m2 = run_conv_train(x, wt, pro, r, conv)
    ref64, same = conv_refs(x, wt, pro, r, conv)
    assert torch.isnan(ref64).any() and not torch.isnan(ref64).all()
    assert_close(y, ref64, same, name="y")
    check_stats(y, count, anchor, offset, m2)
    assert torch.isnan(anchor + offset).all()


# ------------------------------------------------------------------------ prologue zero padding
@pytest.mark.parametrize("shape", [(2, 3, 6, 5, 4, 3, 1, 1, 1), (1, 8, 6, 7, 5, 3, 2, 2, 1)],
                         ids=["flatk_pad1", "pertap_s2_pad2"])
def test_prologue_padding_stays_zero(shape, poisoned_empty):
    """The conv pads the *activated* input with zeros: with a large positive shift,
    relu(bn(0)) > 0, so activating the padding instead would change every border output."""
    x, wt, (mean, scale, _), r, conv = make_conv_case(shape, torch.float32, prologue=True)
    shift = torch.full_like(mean, 3.0)
    pro = (mean, scale, shift)
    y = run_conv_train(x, wt, pro, r, conv, stats=False)[0]
    ref64, same = conv_refs(x, wt, pro, r, conv)
    # the wrong semantics (pad x, then BN + ReLU, then an unpadded conv) differs by far more than the bound
    p = conv["padding"][0]
    xp = F.pad(x.double(), (p, p, p, p))
    v = (1, -1, 1, 1)
    a_wrong = torch.relu((xp - mean.double().view(v)) * scale.double().view(v) + shift.double().view(v))
    wrong = F.conv2d(a_wrong, wt.double(), None, conv["stride"], 0, conv["dilation"])
    assert rel_err(wrong, ref64) > 0.05
    assert_close(y, ref64, same, name="y")


# ------------------------------------------------------------------- statistics: cancellation
def test_conv_stats_cancellation(monkeypatch, poisoned_empty):
    """Outputs ~1000 +- 1e-2 (a large residual): the variance stays within fp32 accuracy, while
    the naive fp32 ``sum(y^2) - sum(y)^2 / n`` would miss by orders of magnitude. Several tiles
    and two merge rounds (``_ROWS_PER_PROG`` = 3)."""
    monkeypatch.setattr(bs, "_ROWS_PER_PROG", 3)
    n, cin, cout, h = 2, 8, 6, 10
    x = torch.randn(n, cin, h, h, device=DEVICE)
    wt = 1e-2 * torch.randn(cout, cin, 3, 3, device=DEVICE) / (cin * 9) ** 0.5
    r = (1000.0 + torch.arange(cout, device=DEVICE, dtype=torch.float32)).view(1, -1, 1, 1).expand(n, cout, h, h)
    r = r.contiguous()
    conv = dict(stride=[1, 1], padding=[1, 1], dilation=[1, 1])
    y, count, anchor, offset, m2 = run_conv_train(x, wt, (None,) * 3, r, conv)
    assert count.item() == n * h * h and (y - r).abs().max() < 0.1  # really |mean| >> std
    mean64, var64 = vec_stats(y)
    yf = y.float()
    check_stats(y, count, anchor, offset, m2)
    bound = max(1e-5, 4 * rel_err(yf.var(dim=DIMS, unbiased=False), var64))
    cnt = y.numel() // cout
    naive = ((yf * yf).sum(dim=DIMS) - yf.sum(dim=DIMS) ** 2 / cnt) / cnt
    assert rel_err(naive, var64) > 100 * bound  # the trap is real: the check above can fail


def test_prologue_centres_before_scaling(poisoned_empty):
    """Input ~1000 +- 1e-2 normalised by its batch BN in the prologue: (x - mean) * scale + shift
    is exact, where the folded x * scale + (shift - mean * scale) would lose every digit."""
    x, wt, pro, r, conv = make_conv_case(CONV_SHAPES["3x3s2_9to5"], torch.float32, prologue=True,
                                         x_mean=1000.0, x_std=1e-2)
    y = run_conv_train(x, wt, pro, r, conv, stats=False)[0]
    ref64, same = conv_refs(x, wt, pro, r, conv)
    assert_close(y, ref64, same, name="y")
    mean, scale, shift = (t.view(1, -1, 1, 1) for t in pro)
    folded = F.conv2d(torch.relu(x * scale + (shift - mean * scale)), wt, None, **conv)
    assert rel_err(folded, ref64) > 100 * max(1e-5, 4 * rel_err(same, ref64))


# ================================================================ partials and their merge
def hand_partials(data, counts):
    """StatsPartials over the rows of ``data`` [n, C] (float32 values) cut into pieces of ``counts``;
    a count of 0 is a row no tile wrote, filled with NaN garbage that the merge must ignore."""
    c = data.shape[1]
    parts = StatsPartials(len(counts), c, data.device)
    i = 0
    for t, k in enumerate(counts):
        if k == 0:
            parts.count[t] = 0.0
            for buf in (parts.anchor, parts.mean, parts.m2):
                buf[t] = float("nan")
            continue
        piece = data[i:i + k].double()
        i += k
        anchor = piece[0]  # the row's anchor: one of its values, as the kernels choose it
        parts.count[t] = float(k)
        parts.anchor[t] = anchor.float()
        parts.mean[t] = (piece - anchor).mean(0).float()
        parts.m2[t] = ((piece - piece.mean(0)) ** 2).sum(0).float()
    assert i == data.shape[0]
    return parts


def check_merged(merged, data, name="merged"):
    """finalize(merged) against the float64 statistics of data [n, C], PyTorch's fp32 as yardstick."""
    count, mean, var = finalize(merged)
    assert count.shape == (1,) and count.item() == data.shape[0]
    d64 = data.double()
    assert_close(mean, d64.mean(0), data.mean(0), name=f"{name} mean")
    assert_close(var, d64.var(0, unbiased=False), data.var(0, unbiased=False), name=f"{name} var")


# Rows no tile wrote (count 0) interleaved with written ones. With 3 rows a program, every
# program starts on a written row or has none (rows 3-5), so round two sees an empty row too.
COUNTS = [5, 0, 1, 0, 0, 0, 2, 0, 7, 9, 4, 1, 6, 0, 2, 3, 5, 0, 1, 8, 2]


class LaunchSpy:
    """Stands in for a Triton kernel: records each launch grid, then launches the real one."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("center,spread", [(0.5, 2.0), (1000.0, 1e-2)], ids=["plain", "mean_1e3_std_1e-2"])
@pytest.mark.parametrize("rows_per_prog", [1024, 3], ids=["one_round", "three_rounds"])
def test_merge_partials_interleaved_empty_rows(rows_per_prog, center, spread, monkeypatch):
    monkeypatch.setattr(bs, "_ROWS_PER_PROG", rows_per_prog)
    spy = LaunchSpy(bs._merge_kernel)
    monkeypatch.setattr(bs, "_merge_kernel", spy)
    data = (center + spread * torch.randn(sum(COUNTS), 37, device=DEVICE, dtype=torch.float64)).float()
    check_merged(merge_partials(hand_partials(data, COUNTS)), data)
    # 37 channels: two channel blocks of 32; 21 rows over 3 per program: 7 -> 3 -> 1 programs
    assert [g[0] for g in spy.grids] == ([1] if rows_per_prog == 1024 else [7, 3, 1])
    assert all(g[1] == 2 for g in spy.grids)


def test_merge_partials_many_rows_one_program():
    """More rows than one program's chunk (BLOCK_T): the Chan merge between chunks in a program."""
    counts = [(i % 5) for i in range(150)]  # every fifth row unwritten, count 0
    counts[0] = 3
    data = (-7.0 + 0.5 * torch.randn(sum(counts), 5, device=DEVICE, dtype=torch.float64)).float()
    check_merged(merge_partials(hand_partials(data, counts)), data)


@pytest.mark.parametrize("rows_per_prog", [1024, 3], ids=["one_round", "three_rounds"])
def test_merge_partials_first_row_unwritten_cancellation(rows_per_prog, monkeypatch):
    """A program whose first row is empty must still merge around a written row's anchor."""
    monkeypatch.setattr(bs, "_ROWS_PER_PROG", rows_per_prog)
    counts = [0] + COUNTS  # the first program's first row is unwritten
    data = (1000.0 + 1e-2 * torch.randn(sum(counts), 37, device=DEVICE, dtype=torch.float64)).float()
    check_merged(merge_partials(hand_partials(data, counts)), data)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("rows_per_prog", [1024, 2], ids=["one_round", "rounds"])
def test_nan_stays_in_its_channel(rows_per_prog, monkeypatch):
    monkeypatch.setattr(bs, "_ROWS_PER_PROG", rows_per_prog)
    x = torch.randn(3, 6, 9, 11, device=DEVICE)  # 297 pixels: 3 partial rows
    x[2, 4, 8, 10] = float("nan")  # in the last tile
    x[0, 1, 0, 0] = float("nan")  # the very first value: the anchor of the first row
    count, mean, var = finalize(merge_partials(channel_stats_partials(x)))
    mean64, var64 = vec_stats(x)
    assert count.item() == 3 * 9 * 11
    assert torch.isnan(mean64).tolist() == [False, True, False, False, True, False]  # the reference agrees
    assert_close(mean, mean64, x.mean(dim=DIMS), name="mean")  # NaN exactly in channels 1 and 4
    assert_close(var, var64, x.var(dim=DIMS, unbiased=False), name="var")


CS_CASES = {
    "nchw_37ch": ((3, 37, 7, 9), NCHW),  # 189 pixels: a full and a ragged tile; 37 channels: 2 blocks
    "cl_37ch": ((3, 37, 7, 9), CL),
    "strided": ((2, 37, 7, 9), "strided"),
    "single_pixel_batch1": ((1, 5, 1, 1), NCHW),  # one value per channel: var 0
    "1x1_spatial_batch4": ((4, 37, 1, 1), CL),  # NCHW- and channels_last-contiguous at once
}


@pytest.mark.parametrize("case", list(CS_CASES), ids=list(CS_CASES))
@pytest.mark.parametrize("center,spread", [(0.5, 2.0), (1000.0, 1e-2)], ids=["plain", "mean_1e3_std_1e-2"])
def test_channel_stats_partials(case, center, spread, poisoned_empty):
    shape, fmt = CS_CASES[case]
    x = center + spread * torch.randn(shape, device=DEVICE)
    if fmt == "strided":
        x = (center + spread * torch.randn(shape[0], shape[1], shape[3], 2 * shape[2], device=DEVICE))
        x = x.transpose(2, 3)[:, :, ::2]
        assert x.shape == shape and not (x.is_contiguous() or x.is_contiguous(memory_format=CL))
    else:
        x = x.contiguous(memory_format=fmt)
    data = x.permute(0, 2, 3, 1).reshape(-1, shape[1])  # [pixels, C]
    check_merged(merge_partials(channel_stats_partials(x)), data, name=case)
    if shape[0] * shape[2] * shape[3] == 1:
        assert torch.equal(finalize(merge_partials(channel_stats_partials(x)))[2], torch.zeros(shape[1], device=DEVICE))


# ======================================================================== batch split + stats
@pytest.mark.parametrize("out_cl", [False, True], ids=["out_nchw", "out_cl"])
def test_batch_split_keeps_stats(monkeypatch, out_cl, poisoned_empty):
    """Over ``_MAX_ROWS`` GEMM rows the launcher splits the batch; each launch writes its own
    statistics rows, and the merged statistics cover the whole batch exactly once.

    Exact: which images each launch takes, and the count (every image counted once). The conv
    values are judged as everywhere else, against float64 and PyTorch's own error: a launch over 3
    images need not round like one over 7 (under the interpreter numpy's matmul may round by row
    position, differently for each BLAS core type), so bitwise equality with the unsplit run would
    test the BLAS, not us."""
    x, wt, pro, r, conv = make_conv_case((7, 6, 5, 4, 9, 3, 1, 1, 1), torch.float32, True, True)
    ref64, same = conv_refs(x, wt, pro, r, conv)
    y_whole, *stats_whole = run_conv_train(x, wt, pro, r, conv, channels_last=out_cl)
    monkeypatch.setattr(cba, "_MAX_ROWS", 3 * 5 * 4 + 1)  # 3 images (60 rows: a full and a ragged tile) a launch
    calls = []
    real = cba._launch_into
    monkeypatch.setattr(cba, "_launch_into", lambda out, *a, **k: (calls.append(out.shape[0]), real(out, *a, **k)))
    y, count, anchor, offset, m2 = run_conv_train(x, wt, pro, r, conv, channels_last=out_cl)
    assert calls == [3, 3, 1]
    assert count.item() == stats_whole[0].item() == 7 * 5 * 4
    assert_close(y, ref64, same, name="y (split)")
    assert_close(y_whole, ref64, same, name="y (whole)")
    check_stats(y, count, anchor, offset, m2)
    check_stats(y_whole, *stats_whole, name="y (whole)")


# ======================================================================== custom op registration
def _opcheck_cases():
    x, wt, pro, r, conv = make_conv_case((1, 3, 5, 5, 4, 3, 1, 1, 1), torch.float32, True, True)
    y, vecs, rr, rvecs = make_bn_case(2, fmt=CL, shape=(2, 3, 4, 4))  # a fake with the wrong layout shows
    g = torch.randn_like(y)
    k = torch.randn(3, device=DEVICE)
    return {
        "conv_train": (ops.conv_train.default,
                       (x, wt, *pro, r, conv["stride"], conv["padding"], conv["dilation"], True, True, torch.float32)),
        "conv_train_nostats": (ops.conv_train.default,
                               (x, wt, None, None, None, None, [2, 2], [0, 0], [1, 1], False, False, torch.float32)),
        "bn_relu_apply": (ops.bn_relu_apply.default, (y, *vecs, rr, *rvecs, torch.float32)),
        "bn_relu_bwd_reduce": (ops.bn_relu_bwd_reduce.default, (g, y, *vecs, rr, *rvecs)),
        "bn_relu_bwd_apply": (ops.bn_relu_bwd_apply.default, (g, y, *vecs, k, k, rr, *rvecs, k, k, torch.float32)),
    }


@pytest.mark.parametrize("name", ["conv_train", "conv_train_nostats", "bn_relu_apply", "bn_relu_bwd_reduce",
                                  "bn_relu_bwd_apply"])
def test_custom_ops_registered_and_opcheck(name):
    op, args = _opcheck_cases()[name]
    assert hasattr(ops, name.replace("_nostats", ""))
    torch.library.opcheck(op, args)


# ================================================================================ empty inputs
@pytest.mark.filterwarnings("ignore:var\\(\\):UserWarning")  # statistics of nothing
@pytest.mark.parametrize("out_cl", [False, True], ids=["out_nchw", "out_cl"])
def test_conv_train_empty_batch(out_cl):
    x, wt, pro, r, conv = make_conv_case((0, 5, 9, 7, 6, 3, 2, 1, 1), torch.float32, True, True)
    y, *st = run_conv_train(x, wt, pro, r, conv, channels_last=out_cl, stats=False)
    assert y.shape == (0, 6, 5, 4) and y.dtype == torch.float32
    assert y.is_contiguous(memory_format=CL if out_cl else NCHW)
    assert all(t.shape == (0,) for t in st)


def test_conv_train_empty_batch_with_stats():
    """Run in a child process: the failure is a crash, not an exception."""
    code = (
        "import torch\n"
        "import resnet_fused.ops.conv_bn_train\n"
        "x, w = torch.randn(0, 5, 7, 7), torch.randn(6, 5, 3, 3)\n"
        "y, count, anchor, off, m2 = torch.ops.resnet_fused.conv_train(\n"
        "    x, w, None, None, None, None, [1, 1], [1, 1], [1, 1], False, True, torch.float32)\n"
        "assert y.shape == (0, 6, 7, 7) and count.tolist() == [0.0], (y.shape, count)\n"
        "assert torch.isnan(m2 / count).all()  # no values: NaN variance, as torch.var of nothing\n"
    )
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"),
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-2000:]}"
