// Launchers of the Monarch Mixer kernels. kernels.cu implements them on the GPU; host_emulation.cpp
// implements the same functions by running the same kernel bodies on the CPU (for the tests). Both throw
// std::runtime_error on failure.
#pragma once

#include <cstdint>

#include "fft_conv.cuh"
#include "gelu_gate.cuh"
#include "mixer_tiles.cuh"

namespace m2 {

enum class ActivationType { kFloat32, kBFloat16 };

// `stream` is the cudaStream_t to launch on (ignored by the host emulation).
void mixer_prologue(const MixerArgs& args, ActivationType type, void* stream);
void mixer_epilogue(const MixerArgs& args, ActivationType type, void* stream);
void mixer_epilogue_backward(const MixerArgs& args, ActivationType type, void* stream);
void mixer_prologue_backward(const MixerArgs& args, ActivationType type, void* stream);
void fft_conv_forward(const FftConvArgs& args, ActivationType rows, void* stream);
void fft_conv_backward(const FftConvArgs& args, ActivationType rows, void* stream);
void gelu_gate_forward(const GeluGateArgs& args, ActivationType type, void* stream);
void gelu_gate_backward(const GeluGateArgs& args, ActivationType type, void* stream);

// The most shared memory one block may use: the current device's opt-in limit on the GPU, an H100's
// (227 KiB) in the host emulation.
int64_t max_shared_bytes_per_block();

#if defined(M2_HOST_EMULATION)
// Order in which the emulation schedules the threads of each barrier interval.
enum class ThreadOrder { kForward = 0, kReverse = 1, kShuffled = 2 };
void set_thread_order(ThreadOrder order);
#endif

}  // namespace m2
