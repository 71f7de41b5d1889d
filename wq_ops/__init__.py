"""wq: quantize Hugging Face checkpoints block by block on Ray (GPTQ, AWQ, RTN).

Packages, each one concern; imports point one way:
jobs -> dist -> (io, calib, formats, model, report, evaluate, bundled) -> quant, pack -> kernels.
(wq_ops.kernels is the Python side of the CUDA sources in the checkout's top-level kernels/ folder.)
"""

__version__ = "0.1.0"
