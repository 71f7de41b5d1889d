"""Quantize-and-pack, pack, and unpack-and-dequantize in the int32 bit-stream layout; the grid math
(scale and zero from a range, codes, dequantization) that every family shares."""
