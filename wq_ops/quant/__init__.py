"""Quantization algorithms: pure functions from tensors to tensors (no I/O, no Ray, no logging).

`rtn` (the grid and round-to-nearest), `hessian` (calibration statistics), `gptq` (second-order error
compensation), `awq` (activation-aware scale and clip search). Each returns a `QuantResult` or a small
frozen dataclass of its own.
"""
