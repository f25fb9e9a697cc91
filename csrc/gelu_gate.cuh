// The GELU gate of the block-diagonal GLU MLP, between its two batched GEMMs:
//   hidden = GELU(gate) * value,  GELU(x) = x Phi(x) (the exact, erf form)
// in the GEMMs' block layouts. The first GEMM writes gate_value as (nblocks, rows, 2 width): features
// [0, I) are the gate and [I, 2I) the value (I = nblocks * width), so feature f of the gate is column
// f mod 2 width of block f / 2 width, and its value is the same column of block nblocks/2 + f / 2 width.
// The second GEMM reads hidden as (nblocks, rows, width): feature f is column f mod width of block
// f / width. One pass reads the gate and value once and writes hidden once, in fp32 arithmetic.
#pragma once

#include <cmath>

#include "common.cuh"

namespace m2 {

struct GeluGateArgs {
  const void* gate_value;     // (nblocks, rows, 2 width)
  void* hidden;               // forward output (nblocks, rows, width)
  const void* grad_hidden;    // backward input (nblocks, rows, width)
  void* grad_gate_value;      // backward output (nblocks, rows, 2 width)
  int64_t rows;
  int nblocks;  // even
  int width;
};

constexpr int kGeluGateThreads = 256;

namespace gelu_detail {

// Offsets of hidden element i, and of its gate and value in gate_value.
struct GeluGateOffsets {
  int64_t hidden, gate, value;
};

M2_HD GeluGateOffsets offsets(const GeluGateArgs& a, int64_t i) {
  const int64_t per_block = a.rows * a.width;
  const int block = static_cast<int>(i / per_block);
  const int64_t row = (i % per_block) / a.width;
  const int64_t feature = static_cast<int64_t>(block) * a.width + i % a.width;
  const int64_t gate_block = feature / (2 * a.width);
  const int64_t column = feature % (2 * a.width);
  const int64_t gate = (gate_block * a.rows + row) * 2 * a.width + column;
  const int64_t value = ((a.nblocks / 2 + gate_block) * a.rows + row) * 2 * a.width + column;
  return {i, gate, value};
}

M2_HD float normal_cdf(float x) { return 0.5f * (1.f + erff(x * 0.70710678118654752f)); }
M2_HD float normal_pdf(float x) { return 0.39894228040143268f * expf(-0.5f * x * x); }

}  // namespace gelu_detail

// Elements [first, end) in steps of `stride`: each thread of a grid-stride loop calls this once.
template <class Act>
M2_DEVICE void gelu_gate_forward_elements(const GeluGateArgs& a, int64_t first, int64_t stride) {
  using namespace gelu_detail;
  const Act* gate_value = static_cast<const Act*>(a.gate_value);
  Act* hidden = static_cast<Act*>(a.hidden);
  const int64_t total = static_cast<int64_t>(a.nblocks) * a.rows * a.width;
  for (int64_t i = first; i < total; i += stride) {
    const GeluGateOffsets at = offsets(a, i);
    const float gate = to_float(gate_value[at.gate]);
    hidden[at.hidden] = from_float<Act>(gate * normal_cdf(gate) * to_float(gate_value[at.value]));
  }
}

// d gate = d hidden * value * GELU'(gate), d value = d hidden * GELU(gate);  GELU'(x) = Phi(x) + x phi(x).
template <class Act>
M2_DEVICE void gelu_gate_backward_elements(const GeluGateArgs& a, int64_t first, int64_t stride) {
  using namespace gelu_detail;
  const Act* gate_value = static_cast<const Act*>(a.gate_value);
  const Act* grad_hidden = static_cast<const Act*>(a.grad_hidden);
  Act* grad_gate_value = static_cast<Act*>(a.grad_gate_value);
  const int64_t total = static_cast<int64_t>(a.nblocks) * a.rows * a.width;
  for (int64_t i = first; i < total; i += stride) {
    const GeluGateOffsets at = offsets(a, i);
    const float gate = to_float(gate_value[at.gate]);
    const float value = to_float(gate_value[at.value]);
    const float grad = to_float(grad_hidden[at.hidden]);
    const float cdf = normal_cdf(gate);
    grad_gate_value[at.gate] = from_float<Act>(grad * value * (cdf + gate * normal_pdf(gate)));
    grad_gate_value[at.value] = from_float<Act>(grad * gate * cdf);
  }
}

}  // namespace m2
