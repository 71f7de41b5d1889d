"""GPTQ block solve: quantize a block of columns and propagate each column's error through the block."""
