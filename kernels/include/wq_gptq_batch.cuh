// Strides (in elements) between the problems of a batched GPTQ block solve: problem b reads and writes its
// tensors at b times these past the first problem's pointers. All zero: one problem (or a shared tensor).
#pragma once

struct BatchStrides {
  long long t = 0, w = 0, m_unit = 0, m_diag = 0, grid = 0, group = 0, codes = 0, parts = 0, loss = 0;
};
