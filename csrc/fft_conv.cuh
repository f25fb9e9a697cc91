// Long convolution of real rows by FFT, entirely in one thread block per row (forward) or per channel
// (backward), in shared memory.
//
// The model's convolution is circular of size n = 2 L' on rows zero beyond `length` <= L', keeping
// outputs [0, length): y = irfft(rfft(x, n) * K, n)[:length], K = (n/2 + 1) bins of the kernel spectrum.
// A row of n complex points does not fit in shared memory at n = 65536, so the n bins are split into
// S = n / P sub-problems of P bins (decimation in frequency), s = 0 .. S-1 holding bins k = s + S q:
//   X[s + S q] = DFT_P(a_s)[q],          a_s[m] = sum_j x[m + P j] w^(s (m + P j)),   w = exp(-2 pi i / n)
//   y[m + P j] = 1/n sum_s Re( w^(-s (m + P j)) IDFT_P(X_s K_s)[m] )   (IDFT unnormalised)
// For real rows, sub-problem S - s is the complex conjugate of s, so only s = 0 .. S/2 are computed and
// s = 1 .. S/2-1 count twice. Each sub-problem is one forward and one inverse FFT of P points in shared
// memory; the output row accumulates in shared memory. The forward FFT is decimation in frequency
// (natural order in, bit-reversed out) and the inverse is decimation in time (bit-reversed in, natural
// out), so no reordering pass is needed: the pointwise product just knows which bin each slot holds.
#pragma once

#include "common.cuh"

namespace m2 {

// Rows are stored as `Row` (float or BFloat16, the activations' type) and computed in fp32.
struct FftConvArgs {
  const void* input;               // (batch, channels, length) rows
  const void* grad_output;         // backward: (batch, channels, length), the gradient of the convolution
  void* output;                    // forward: the convolution; backward: the gradient of `input`
  const Complex* spectrum;         // (split, n/2 + 1): the spectra of channels [0, split)
  const Complex* second_spectrum;  // (channels - split, n/2 + 1): channels [split, channels); may be null
  Complex* grad_spectrum;          // backward: gradients in the layout of the spectra
  Complex* grad_second_spectrum;
  const Complex* twiddles;         // (n,): exp(-2 pi i k / n)
  int batch;
  int channels;
  int split;
  int length;
  int log2_n;
  int log2_p;
};

// Threads of one block for sub-problems of 2^log2_p points: one radix-8 butterfly group each, 64 to 512.
M2_HD int fft_conv_threads(int log2_p) {
  const int groups = (1 << log2_p) / 8;
  return groups < 64 ? 64 : (groups > 512 ? 512 : groups);
}

// A P-point buffer in shared memory leaves one empty slot after every 16 points: without it the radix-8
// passes whose butterfly groups are 1 or 8 points apart put up to 16 threads of a warp on one bank; with
// it every pass, and every run of consecutive points, is free of bank conflicts.
M2_HD int padded_slot(int i) { return i + (i >> 4); }
M2_HD int padded_points(int log2_p) { return padded_slot(1 << log2_p); }

// Shared memory of one block: the fp32 output row (an even count keeps the complex buffers aligned),
// then one padded complex buffer of P points (two in the backward pass).
M2_HD int64_t fft_conv_shared_bytes(int length, int log2_p, bool backward) {
  const int64_t row = static_cast<int64_t>((length + 1) / 2 * 2) * sizeof(float);
  const int64_t buffer = static_cast<int64_t>(padded_points(log2_p)) * static_cast<int64_t>(sizeof(Complex));
  return row + (backward ? 2 : 1) * buffer;
}

// The sub-problem size 2^log2_p: as large as possible up to 4096 points and n/8 (so that S >= 8 and the
// wasted half of sub-problems 0 and S/2 stays small) while the block fits `shared_limit` bytes.
// Returns -1 when nothing fits.
inline int choose_fft_conv_log2_p(int log2_n, int length, bool backward, int64_t shared_limit) {
  const int largest = log2_n - 3 < 12 ? log2_n - 3 : 12;
  for (int log2_p = largest; log2_p >= 4; --log2_p)
    if (fft_conv_shared_bytes(length, log2_p, backward) <= shared_limit) return log2_p;
  return -1;
}

namespace fft_detail {

// Bin k of a real row's full spectrum from its n/2 + 1 stored bins.
M2_HD Complex spectrum_bin(const Complex* spectrum, int k, int n) {
  return k <= n / 2 ? spectrum[k] : conjugate(spectrum[n - k]);
}

// work[m] = a_s[m] for m < P: the folded, twisted row of sub-problem s. w^(s (m + P j)) is factored as
// w^(s m) (one table load per m) times w^(s P j) = exp(-2 pi i s j / S), the same for the whole block.
template <class Row, class Block>
M2_DEVICE void fold(const Block& block, const Row* row, const FftConvArgs& a, int s, Complex* work) {
  const int p = 1 << a.log2_p;
  const int half_subproblems = 1 << (a.log2_n - a.log2_p - 1);
  const int index_mask = (1 << a.log2_n) - 1;
  for (int m = block.thread(); m < p; m += block.size()) {
    Complex sum{0.f, 0.f};
    for (int j = 0; j < half_subproblems; ++j) {  // rows are zero from n/2 on
      const int t = m + (j << a.log2_p);
      if (t >= a.length) break;
      const Complex w = a.twiddles[(s * (j << a.log2_p)) & index_mask];
      const float value = to_float(row[t]);
      sum.re += value * w.re;
      sum.im += value * w.im;
    }
    work[padded_slot(m)] = mul(sum, a.twiddles[(s * m) & index_mask]);
  }
}

// acc[t] += weight * Re(w^(-s t) work[t mod P]) for t < length: sub-problem s's share of the output,
// with the twist factored as in fold().
template <class Block>
M2_DEVICE void accumulate(const Block& block, const Complex* work, const FftConvArgs& a, int s, float* acc) {
  const int p = 1 << a.log2_p;
  const int half_subproblems = 1 << (a.log2_n - a.log2_p - 1);
  const int index_mask = (1 << a.log2_n) - 1;
  // Sub-problems 0 and S/2 are their own conjugates; the others stand for their conjugate pair too.
  const float weight = (s == 0 || s == half_subproblems ? 1.f : 2.f) / static_cast<float>(1 << a.log2_n);
  for (int m = block.thread(); m < p; m += block.size()) {
    const Complex value = scale(mul_conj(work[padded_slot(m)], a.twiddles[(s * m) & index_mask]), weight);
    for (int j = 0; j < half_subproblems; ++j) {
      const int t = m + (j << a.log2_p);
      if (t >= a.length) break;
      const Complex w = a.twiddles[(s * (j << a.log2_p)) & index_mask];
      acc[t] += value.re * w.re + value.im * w.im;
    }
  }
}

// One pass of kLog2Radix radix-2 decimation-in-frequency stages, starting at stage `first_stage`
// (stage i has butterfly span P / 2^(i+1)). Each thread loads a group of 2^kLog2Radix points into
// registers, runs the stages there and stores them back to the same slots, so passes need no second buffer.
template <int kLog2Radix, class Block>
M2_DEVICE void dif_pass(const Block& block, Complex* buf, const FftConvArgs& a, int first_stage) {
  constexpr int kRadix = 1 << kLog2Radix;
  const int log2_last_span = a.log2_p - first_stage - kLog2Radix;  // span of the pass's last stage
  const int last_span = 1 << log2_last_span;
  const int groups = 1 << (a.log2_p - kLog2Radix);
  for (int g = block.thread(); g < groups; g += block.size()) {
    const int low = g & (last_span - 1);
    const int base = ((g >> log2_last_span) << (log2_last_span + kLog2Radix)) | low;
    Complex d[kRadix];
#pragma unroll
    for (int r = 0; r < kRadix; ++r) d[r] = buf[padded_slot(base + r * last_span)];
#pragma unroll
    for (int log2_local_span = kLog2Radix - 1; log2_local_span >= 0; --log2_local_span) {
      const int local_span = 1 << log2_local_span;
      // twiddle W_{2h}^j = w^(j n / 2h) with h = local_span * last_span
      const int twiddle_shift = a.log2_n - (log2_last_span + log2_local_span + 1);
#pragma unroll
      for (int r = 0; r < kRadix; ++r) {
        if (r & local_span) continue;
        const int j = low + (r & (local_span - 1)) * last_span;
        const Complex upper = d[r];
        const Complex lower = d[r + local_span];
        d[r] = upper + lower;
        d[r + local_span] = mul(upper - lower, a.twiddles[j << twiddle_shift]);
      }
    }
#pragma unroll
    for (int r = 0; r < kRadix; ++r) buf[padded_slot(base + r * last_span)] = d[r];
  }
}

// The inverse of dif_pass's stages (conjugate twiddles, stages in reverse), without the 1/2 per stage.
template <int kLog2Radix, class Block>
M2_DEVICE void dit_pass(const Block& block, Complex* buf, const FftConvArgs& a, int first_stage) {
  constexpr int kRadix = 1 << kLog2Radix;
  const int log2_last_span = a.log2_p - first_stage - kLog2Radix;
  const int last_span = 1 << log2_last_span;
  const int groups = 1 << (a.log2_p - kLog2Radix);
  for (int g = block.thread(); g < groups; g += block.size()) {
    const int low = g & (last_span - 1);
    const int base = ((g >> log2_last_span) << (log2_last_span + kLog2Radix)) | low;
    Complex d[kRadix];
#pragma unroll
    for (int r = 0; r < kRadix; ++r) d[r] = buf[padded_slot(base + r * last_span)];
#pragma unroll
    for (int log2_local_span = 0; log2_local_span < kLog2Radix; ++log2_local_span) {
      const int local_span = 1 << log2_local_span;
      const int twiddle_shift = a.log2_n - (log2_last_span + log2_local_span + 1);
#pragma unroll
      for (int r = 0; r < kRadix; ++r) {
        if (r & local_span) continue;
        const int j = low + (r & (local_span - 1)) * last_span;
        const Complex upper = d[r];
        const Complex lower = mul_conj(d[r + local_span], a.twiddles[j << twiddle_shift]);
        d[r] = upper + lower;
        d[r + local_span] = upper - lower;
      }
    }
#pragma unroll
    for (int r = 0; r < kRadix; ++r) buf[padded_slot(base + r * last_span)] = d[r];
  }
}

// In-place forward DFT of P points: natural order in, bit-reversed order out. `second` (may be null) is
// transformed in the same passes. Radix-8 passes first, then one pass for the remaining 1 or 2 stages.
template <class Block>
M2_DEVICE void fft_forward(const Block& block, Complex* first, Complex* second, const FftConvArgs& a) {
  int stage = 0;
  for (; stage + 3 <= a.log2_p; stage += 3) {
    dif_pass<3>(block, first, a, stage);
    if (second) dif_pass<3>(block, second, a, stage);
    block.sync();
  }
  const int remaining = a.log2_p - stage;
  if (remaining == 2) {
    dif_pass<2>(block, first, a, stage);
    if (second) dif_pass<2>(block, second, a, stage);
    block.sync();
  } else if (remaining == 1) {
    dif_pass<1>(block, first, a, stage);
    if (second) dif_pass<1>(block, second, a, stage);
    block.sync();
  }
}

// In-place unnormalised inverse DFT of P points: bit-reversed order in, natural order out.
template <class Block>
M2_DEVICE void fft_inverse(const Block& block, Complex* buf, const FftConvArgs& a) {
  const int remaining = a.log2_p % 3;
  int stage = a.log2_p - remaining;
  if (remaining == 2) {
    dit_pass<2>(block, buf, a, stage);
    block.sync();
  } else if (remaining == 1) {
    dit_pass<1>(block, buf, a, stage);
    block.sync();
  }
  for (stage -= 3; stage >= 0; stage -= 3) {
    dit_pass<3>(block, buf, a, stage);
    block.sync();
  }
}

M2_HD const Complex* channel_spectrum(const FftConvArgs& a, int channel) {
  const int64_t bins = (1 << (a.log2_n - 1)) + 1;
  return channel < a.split ? a.spectrum + channel * bins : a.second_spectrum + (channel - a.split) * bins;
}

M2_HD Complex* channel_grad_spectrum(const FftConvArgs& a, int channel) {
  const int64_t bins = (1 << (a.log2_n - 1)) + 1;
  return channel < a.split ? a.grad_spectrum + channel * bins : a.grad_second_spectrum + (channel - a.split) * bins;
}

template <class Block>
M2_DEVICE void fill(const Block& block, float* values, int count, float value) {
  for (int i = block.thread(); i < count; i += block.size()) values[i] = value;
}

template <class Row, class Block>
M2_DEVICE void store_row(const Block& block, const float* from, Row* to, int count) {
  for (int i = block.thread(); i < count; i += block.size()) to[i] = from_float<Row>(from[i]);
}

}  // namespace fft_detail

// output[row] = the convolution of input[row] with its channel's kernel, for row = batch_index * channels +
// channel. `shared` holds fft_conv_shared_bytes(length, log2_p, false) bytes.
template <class Row, class Block>
M2_DEVICE void fft_conv_forward_row(const Block& block, const FftConvArgs& a, int channel, int batch_index,
                                    float* shared) {
  using namespace fft_detail;
  const int n = 1 << a.log2_n;
  const int p = 1 << a.log2_p;
  const int log2_subproblems = a.log2_n - a.log2_p;
  const int half_subproblems = 1 << (log2_subproblems - 1);
  float* acc = shared;
  Complex* work = reinterpret_cast<Complex*>(shared + (a.length + 1) / 2 * 2);
  const int64_t row_offset = (static_cast<int64_t>(batch_index) * a.channels + channel) * a.length;
  const Complex* spectrum = channel_spectrum(a, channel);

  fill(block, acc, a.length, 0.f);
  for (int s = 0; s <= half_subproblems; ++s) {
    fold(block, static_cast<const Row*>(a.input) + row_offset, a, s, work);
    block.sync();
    fft_forward(block, work, nullptr, a);
    for (int slot = block.thread(); slot < p; slot += block.size()) {
      const int k = s + (reverse_bits(slot, a.log2_p) << log2_subproblems);
      work[padded_slot(slot)] = mul(work[padded_slot(slot)], spectrum_bin(spectrum, k, n));
    }
    block.sync();
    fft_inverse(block, work, a);
    accumulate(block, work, a, s, acc);
    block.sync();
  }
  store_row(block, acc, static_cast<Row*>(a.output) + row_offset, a.length);
}

// For one channel, over the whole batch: output[row] = the gradient of input[row] (circular correlation
// of grad_output[row] with the kernel), and the channel's spectrum gradient summed over the batch, in
// PyTorch's convention for complex inputs (d/d re + i d/d im):
//   dK[k] = c_k / n sum_b conj(X_b[k]) DY_b[k],  c_k = 1 at k = 0 and n/2, else 2.
// Every stored bin comes from exactly one (sub-problem, slot): bins above n/2 of sub-problems
// 1 .. S/2-1 are written as their mirrors n - k, which sub-problem S - s (not computed) would hold.
// `shared` holds fft_conv_shared_bytes(length, log2_p, true) bytes.
template <class Row, class Block>
M2_DEVICE void fft_conv_backward_channel(const Block& block, const FftConvArgs& a, int channel, float* shared) {
  using namespace fft_detail;
  const int n = 1 << a.log2_n;
  const int p = 1 << a.log2_p;
  const int log2_subproblems = a.log2_n - a.log2_p;
  const int half_subproblems = 1 << (log2_subproblems - 1);
  float* acc = shared;
  Complex* input_work = reinterpret_cast<Complex*>(shared + (a.length + 1) / 2 * 2);
  Complex* grad_work = input_work + padded_points(a.log2_p);
  const Complex* spectrum = channel_spectrum(a, channel);
  Complex* grad_spectrum = channel_grad_spectrum(a, channel);

  for (int b = 0; b < a.batch; ++b) {
    const int64_t row_offset = (static_cast<int64_t>(b) * a.channels + channel) * a.length;
    fill(block, acc, a.length, 0.f);
    for (int s = 0; s <= half_subproblems; ++s) {
      fold(block, static_cast<const Row*>(a.input) + row_offset, a, s, input_work);
      fold(block, static_cast<const Row*>(a.grad_output) + row_offset, a, s, grad_work);
      block.sync();
      fft_forward(block, input_work, grad_work, a);
      for (int slot = block.thread(); slot < p; slot += block.size()) {
        const int k = s + (reverse_bits(slot, a.log2_p) << log2_subproblems);
        const Complex x = input_work[padded_slot(slot)];
        const Complex dy = grad_work[padded_slot(slot)];
        int target = -1;
        Complex product{0.f, 0.f};
        if (k <= n / 2) {
          target = k;
          product = mul_conj(dy, x);
        } else if (s != 0 && s != half_subproblems) {
          target = n - k;
          product = mul_conj(x, dy);
        }
        if (target >= 0) {
          const float weight = (target == 0 || target == n / 2 ? 1.f : 2.f) / static_cast<float>(n);
          const Complex contribution = scale(product, weight);
          grad_spectrum[target] = b == 0 ? contribution : grad_spectrum[target] + contribution;
        }
        grad_work[padded_slot(slot)] = mul_conj(dy, spectrum_bin(spectrum, k, n));
      }
      block.sync();
      fft_inverse(block, grad_work, a);
      accumulate(block, grad_work, a, s, acc);
      block.sync();
    }
    store_row(block, acc, static_cast<Row*>(a.output) + row_offset, a.length);
    block.sync();
  }
}

}  // namespace m2
