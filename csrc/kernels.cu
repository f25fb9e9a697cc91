// CUDA kernels of the Monarch Mixer sequence mixer: thin __global__ wrappers around the block bodies of
// fft_conv.cuh and mixer_tiles.cuh, and their launchers. No PyTorch headers here, so that this file
// compiles quickly and on its own (the CPU tests build it with nvcc for sm_80 and sm_90).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "kernels.h"

namespace m2 {
namespace {

extern __shared__ __align__(16) float dynamic_shared[];

template <class Act>
__global__ void __launch_bounds__(kMixerThreads) mixer_prologue_kernel(MixerArgs args) {
  mixer_prologue_block<Act>(CudaBlock{}, args, blockIdx.z, blockIdx.x, blockIdx.y, dynamic_shared);
}

template <class Act>
__global__ void __launch_bounds__(kMixerThreads) mixer_epilogue_kernel(MixerArgs args) {
  mixer_epilogue_block<Act>(CudaBlock{}, args, blockIdx.z, blockIdx.x, blockIdx.y, dynamic_shared);
}

template <class Act>
__global__ void __launch_bounds__(kMixerThreads) mixer_epilogue_backward_kernel(MixerArgs args) {
  mixer_epilogue_backward_block<Act>(CudaBlock{}, args, blockIdx.z, blockIdx.x, blockIdx.y, dynamic_shared);
}

template <class Act>
__global__ void __launch_bounds__(kMixerThreads) mixer_prologue_backward_kernel(MixerArgs args) {
  mixer_prologue_backward_block<Act>(CudaBlock{}, args, blockIdx.z, blockIdx.x, blockIdx.y, dynamic_shared);
}

// One block per row; rows of one channel are consecutive blocks so that they share the spectrum in L2.
template <class Row>
__global__ void __launch_bounds__(512) fft_conv_forward_kernel(FftConvArgs args) {
  const int channel = blockIdx.x / args.batch;
  const int batch_index = blockIdx.x % args.batch;
  fft_conv_forward_row<Row>(CudaBlock{}, args, channel, batch_index, dynamic_shared);
}

// One block per channel, looping over the batch, so that the spectrum gradient needs no atomics.
template <class Row>
__global__ void __launch_bounds__(512) fft_conv_backward_kernel(FftConvArgs args) {
  fft_conv_backward_channel<Row>(CudaBlock{}, args, blockIdx.x, dynamic_shared);
}

template <class Act>
__global__ void __launch_bounds__(kGeluGateThreads) gelu_gate_forward_kernel(GeluGateArgs args) {
  gelu_gate_forward_elements<Act>(args, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                                  static_cast<int64_t>(gridDim.x) * blockDim.x);
}

template <class Act>
__global__ void __launch_bounds__(kGeluGateThreads) gelu_gate_backward_kernel(GeluGateArgs args) {
  gelu_gate_backward_elements<Act>(args, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                                   static_cast<int64_t>(gridDim.x) * blockDim.x);
}

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

template <class Args>
void launch(void (*kernel)(Args), dim3 grid, int threads, int64_t shared_bytes, void* stream, const char* name,
            const Args& args) {
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes)),
        name);
  kernel<<<grid, threads, shared_bytes, static_cast<cudaStream_t>(stream)>>>(args);
  check(cudaGetLastError(), name);
}

dim3 tile_grid(const MixerArgs& a) {
  const TileGrid grid = mixer_tile_grid(a.hidden, a.length);
  return dim3(grid.chunks, grid.channel_tiles, a.batch);
}

void launch_tiles(void (*f32)(MixerArgs), void (*bf16)(MixerArgs), const MixerArgs& a, ActivationType type,
                  int shared_floats, void* stream, const char* name) {
  const int64_t bytes = static_cast<int64_t>(shared_floats) * sizeof(float);
  launch(type == ActivationType::kFloat32 ? f32 : bf16, tile_grid(a), kMixerThreads, bytes, stream, name, a);
}

}  // namespace

void mixer_prologue(const MixerArgs& a, ActivationType type, void* stream) {
  launch_tiles(mixer_prologue_kernel<float>, mixer_prologue_kernel<BFloat16>, a, type, kPrologueSharedFloats, stream,
               "mixer_prologue");
}

void mixer_epilogue(const MixerArgs& a, ActivationType type, void* stream) {
  launch_tiles(mixer_epilogue_kernel<float>, mixer_epilogue_kernel<BFloat16>, a, type, kEpilogueSharedFloats, stream,
               "mixer_epilogue");
}

void mixer_epilogue_backward(const MixerArgs& a, ActivationType type, void* stream) {
  launch_tiles(mixer_epilogue_backward_kernel<float>, mixer_epilogue_backward_kernel<BFloat16>, a, type,
               kEpilogueBackwardSharedFloats, stream, "mixer_epilogue_backward");
}

void mixer_prologue_backward(const MixerArgs& a, ActivationType type, void* stream) {
  launch_tiles(mixer_prologue_backward_kernel<float>, mixer_prologue_backward_kernel<BFloat16>, a, type,
               kPrologueBackwardSharedFloats, stream, "mixer_prologue_backward");
}

void fft_conv_forward(const FftConvArgs& a, ActivationType rows, void* stream) {
  const dim3 grid(static_cast<unsigned>(a.channels) * static_cast<unsigned>(a.batch));
  launch(rows == ActivationType::kFloat32 ? fft_conv_forward_kernel<float> : fft_conv_forward_kernel<BFloat16>, grid,
         fft_conv_threads(a.log2_p), fft_conv_shared_bytes(a.length, a.log2_p, false), stream, "fft_conv_forward", a);
}

void fft_conv_backward(const FftConvArgs& a, ActivationType rows, void* stream) {
  launch(rows == ActivationType::kFloat32 ? fft_conv_backward_kernel<float> : fft_conv_backward_kernel<BFloat16>,
         dim3(a.channels), fft_conv_threads(a.log2_p), fft_conv_shared_bytes(a.length, a.log2_p, true), stream,
         "fft_conv_backward", a);
}

namespace {

// A grid-stride loop over the hidden elements: enough blocks to fill the GPU several times over.
dim3 gelu_gate_grid(const GeluGateArgs& a) {
  const int64_t total = static_cast<int64_t>(a.nblocks) * a.rows * a.width;
  const int64_t blocks = (total + kGeluGateThreads - 1) / kGeluGateThreads;
  return dim3(static_cast<unsigned>(blocks < 65536 ? blocks : 65536));
}

}  // namespace

void gelu_gate_forward(const GeluGateArgs& a, ActivationType type, void* stream) {
  launch(type == ActivationType::kFloat32 ? gelu_gate_forward_kernel<float> : gelu_gate_forward_kernel<BFloat16>,
         gelu_gate_grid(a), kGeluGateThreads, 0, stream, "gelu_gate_forward", a);
}

void gelu_gate_backward(const GeluGateArgs& a, ActivationType type, void* stream) {
  launch(type == ActivationType::kFloat32 ? gelu_gate_backward_kernel<float> : gelu_gate_backward_kernel<BFloat16>,
         gelu_gate_grid(a), kGeluGateThreads, 0, stream, "gelu_gate_backward", a);
}

int64_t max_shared_bytes_per_block() {
  int device = 0;
  int bytes = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "cudaDeviceGetAttribute");
  return bytes;
}

}  // namespace m2
