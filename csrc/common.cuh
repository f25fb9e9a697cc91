// Shared building blocks of the Monarch Mixer kernels, compiled both by nvcc (the CUDA kernels) and by a
// plain C++ compiler (the host emulation the CPU tests run).
//
// Every kernel body is a template over its `Block`: `block.thread()` is the thread's index, `block.size()`
// the number of threads and `block.sync()` the barrier. On the GPU that is threadIdx.x, blockDim.x and
// __syncthreads(); the host emulation (host_emulation.cpp) runs each thread as a fiber that yields at
// the barrier and schedules the fibers of a barrier interval one after another, in forward, reverse or
// shuffled order, so a missing barrier changes the result and the CPU tests catch it. Bodies use no warp
// intrinsics, so that both run the same code.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define M2_HD __host__ __device__ __forceinline__
#define M2_DEVICE __device__ __forceinline__
#else
#define M2_HD inline
#define M2_DEVICE inline
#endif

namespace m2 {

#if defined(__CUDACC__)
// The CUDA thread block a kernel body runs in.
struct CudaBlock {
  __device__ int thread() const { return static_cast<int>(threadIdx.x); }
  __device__ int size() const { return static_cast<int>(blockDim.x); }
  __device__ void sync() const { __syncthreads(); }
};
#endif

// A single-precision complex number laid out as PyTorch's complex64 (real, imaginary).
struct alignas(8) Complex {
  float re;
  float im;
};

M2_HD Complex operator+(Complex a, Complex b) { return {a.re + b.re, a.im + b.im}; }
M2_HD Complex operator-(Complex a, Complex b) { return {a.re - b.re, a.im - b.im}; }
M2_HD Complex scale(Complex a, float s) { return {a.re * s, a.im * s}; }
M2_HD Complex conjugate(Complex a) { return {a.re, -a.im}; }
M2_HD Complex mul(Complex a, Complex b) { return {a.re * b.re - a.im * b.im, a.re * b.im + a.im * b.re}; }
// a * conj(b)
M2_HD Complex mul_conj(Complex a, Complex b) { return {a.re * b.re + a.im * b.im, a.im * b.re - a.re * b.im}; }

// bfloat16 storage: the upper 16 bits of a float32, rounded to nearest even as PyTorch does.
struct BFloat16 {
  uint16_t bits;
};

M2_HD float float_from_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
#endif
}

M2_HD uint32_t bits_from_float(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(value);
#else
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
#endif
}

M2_HD float to_float(float value) { return value; }
M2_HD float to_float(BFloat16 value) { return float_from_bits(static_cast<uint32_t>(value.bits) << 16); }

template <class T>
M2_HD T from_float(float value);

template <>
M2_HD float from_float<float>(float value) {
  return value;
}

template <>
M2_HD BFloat16 from_float<BFloat16>(float value) {
  uint32_t bits = bits_from_float(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((bits >> 16) | 0x0040u)};  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return {static_cast<uint16_t>(bits >> 16)};
}

// The `bits` lowest bits of `value` in reverse order.
M2_HD int reverse_bits(int value, int bits) {
#if defined(__CUDA_ARCH__)
  return bits == 0 ? 0 : static_cast<int>(__brev(static_cast<unsigned>(value)) >> (32 - bits));
#else
  int reversed = 0;
  for (int i = 0; i < bits; ++i) reversed |= ((value >> i) & 1) << (bits - 1 - i);
  return reversed;
#endif
}

}  // namespace m2
