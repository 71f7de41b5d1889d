"""CUDA pack / quantize+pack / unpack+dequantize against kernels/quant_pack/reference.py: exact."""

import pytest
import torch

from wq_ops.kernels.quant_pack import reference

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("rows,cols", [(1, 32), (3, 96), (118, 4096), (4096, 14336)])
def test_pack_rows_exact(cuda, bits, rows, cols):
    from wq_ops.kernels.quant_pack import cuda as qp_cuda

    codes = torch.randint(0, 2**bits, (rows, cols), dtype=torch.uint8, device=cuda)
    assert torch.equal(qp_cuda.pack_rows(codes, bits), reference.pack_rows(codes, bits))


def _grid(rows, cols, group_size, bits, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    wg = w.reshape(rows, cols // group_size, group_size)
    scale, zero = reference.grid_from_range(wg.amin(-1), wg.amax(-1), bits=bits, sym=False,
                                            scale_dtype=torch.bfloat16)
    return w.to(device), scale.to(device), zero.to(device)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,cols,group_size", [(3, 128, 32), (118, 1024, 128), (2048, 8192, 128)])
def test_quantize_pack_and_back_exact(cuda, bits, dtype, rows, cols, group_size):
    from wq_ops.kernels.quant_pack import cuda as qp_cuda

    w, scale, zero = _grid(rows, cols, group_size, bits, cuda, seed=rows + bits)
    w = w.to(dtype)
    ref_packed = reference.quantize_pack(w, scale, zero, bits=bits)
    packed = qp_cuda.quantize_pack(w, scale, zero, bits=bits)
    assert torch.equal(packed, ref_packed)
    ref_w = reference.unpack_dequantize(ref_packed, scale, zero, bits=bits, cols=cols)
    got_w = qp_cuda.unpack_dequantize(packed, scale, zero, bits=bits, cols=cols)
    assert torch.equal(got_w, ref_w)


def test_bad_arguments_raise_and_name_the_argument(cuda):
    """Checked in Python first: a failed check inside the extension ended the process on the H100 machine."""
    from wq_ops.errors import KernelError
    from wq_ops.kernels.quant_pack import cuda as pack_cuda

    with pytest.raises(KernelError, match=r"codes must be a torch.uint8 \(\*, \*\) tensor.*got torch.float32"):
        pack_cuda.pack_rows(torch.zeros(4, 32, device=cuda), 4)
    with pytest.raises(KernelError, match="bits=0 must be 1..8"):
        pack_cuda.pack_rows(torch.zeros(4, 32, device=cuda, dtype=torch.uint8), 0)
    scale, zero = torch.ones(4, 3, device=cuda), torch.zeros(4, 3, device=cuda, dtype=torch.uint8)
    with pytest.raises(KernelError, match="128 columns do not split into the grid's 3 groups"):
        pack_cuda.quantize_pack(torch.zeros(4, 128, device=cuda), scale, zero, bits=4)
    with pytest.raises(KernelError, match=r"packed must be a torch.int32 \(\*, 16\) tensor"):
        pack_cuda.unpack_dequantize(torch.zeros(4, 8, device=cuda, dtype=torch.int32), scale[:, :2], zero[:, :2],
                                    bits=4, cols=128)
