// The kernels of kernels.cu run on the CPU, for the tests: each block's threads are fibers (ucontext)
// sharing one shared-memory buffer, and `sync()` yields to a scheduler that runs every fiber up to its next
// barrier, one after another, before any passes it. That is CUDA's barrier semantics with one particular
// interleaving; the tests run forward, reverse and shuffled interleavings, so that code which relies on
// an order the GPU does not guarantee (a missing barrier) gives a different result. Shared memory is
// filled with NaN before each block, so reading what no thread wrote poisons the output.
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <stdexcept>
#include <vector>

#include "kernels.h"

namespace m2 {
namespace {

ThreadOrder g_thread_order = ThreadOrder::kForward;
std::mt19937 g_shuffle(12345);

class BlockEmulator;

// What a kernel body sees as its block: this fiber's thread index and the barrier.
struct HostBlock {
  BlockEmulator* emulator;
  int index;
  int threads;
  int thread() const { return index; }
  int size() const { return threads; }
  void sync() const;
};

class BlockEmulator {
 public:
  explicit BlockEmulator(int threads) : threads_(threads), fibers_(threads) {
    for (Fiber& fiber : fibers_) fiber.stack.resize(kStackBytes);
  }

  // Runs body(block) on every thread of one block, to completion.
  void run(const std::function<void(const HostBlock&)>& body) {
    body_ = &body;
    for (int t = 0; t < threads_; ++t) {
      Fiber& fiber = fibers_[t];
      fiber.finished = false;
      if (getcontext(&fiber.context) != 0) throw std::runtime_error("getcontext failed");
      fiber.context.uc_stack.ss_sp = fiber.stack.data();
      fiber.context.uc_stack.ss_size = fiber.stack.size();
      fiber.context.uc_link = &scheduler_;
      makecontext(&fiber.context, &BlockEmulator::entry, 0);
    }
    std::vector<int> order(threads_);
    while (true) {
      std::iota(order.begin(), order.end(), 0);
      if (g_thread_order == ThreadOrder::kReverse) std::reverse(order.begin(), order.end());
      if (g_thread_order == ThreadOrder::kShuffled) std::shuffle(order.begin(), order.end(), g_shuffle);
      for (int t : order) {
        if (fibers_[t].finished) continue;
        running_ = t;
        current_ = this;
        if (swapcontext(&scheduler_, &fibers_[t].context) != 0) throw std::runtime_error("swapcontext failed");
      }
      const int finished = static_cast<int>(
          std::count_if(fibers_.begin(), fibers_.end(), [](const Fiber& f) { return f.finished; }));
      if (finished == threads_) return;
      if (finished > 0) throw std::runtime_error("barrier divergence: some threads ended while others wait at sync()");
    }
  }

  // Called by a fiber at sync(): back to the scheduler until the next interval.
  void yield(int thread) {
    if (swapcontext(&fibers_[thread].context, &scheduler_) != 0) throw std::runtime_error("swapcontext failed");
  }

 private:
  static constexpr size_t kStackBytes = 64 * 1024;
  struct Fiber {
    ucontext_t context;
    std::vector<char> stack;
    bool finished = false;
  };

  static void entry() {
    BlockEmulator* self = current_;
    const int thread = self->running_;
    (*self->body_)(HostBlock{self, thread, self->threads_});
    self->fibers_[thread].finished = true;
  }

  static thread_local BlockEmulator* current_;
  int threads_;
  std::vector<Fiber> fibers_;
  ucontext_t scheduler_;
  int running_ = 0;
  const std::function<void(const HostBlock&)>* body_ = nullptr;
};

thread_local BlockEmulator* BlockEmulator::current_ = nullptr;

void HostBlock::sync() const { emulator->yield(index); }

std::vector<float> poisoned_shared(int64_t floats) {
  return std::vector<float>(static_cast<size_t>(floats), std::numeric_limits<float>::quiet_NaN());
}

template <class Body>
void run_tile_kernel(const MixerArgs& a, int shared_floats, Body body) {
  const TileGrid grid = mixer_tile_grid(a.hidden, a.length);
  BlockEmulator emulator(kMixerThreads);
  for (int b = 0; b < a.batch; ++b)
    for (int chunk = 0; chunk < grid.chunks; ++chunk)
      for (int tile = 0; tile < grid.channel_tiles; ++tile) {
        std::vector<float> shared = poisoned_shared(shared_floats);
        emulator.run([&](const HostBlock& block) { body(block, b, chunk, tile, shared.data()); });
      }
}

}  // namespace

void set_thread_order(ThreadOrder order) { g_thread_order = order; }

int64_t max_shared_bytes_per_block() { return 227 * 1024; }

void mixer_prologue(const MixerArgs& a, ActivationType type, void*) {
  run_tile_kernel(a, kPrologueSharedFloats, [&](const HostBlock& block, int b, int chunk, int tile, float* shared) {
    if (type == ActivationType::kFloat32) mixer_prologue_block<float>(block, a, b, chunk, tile, shared);
    else mixer_prologue_block<BFloat16>(block, a, b, chunk, tile, shared);
  });
}

void mixer_epilogue(const MixerArgs& a, ActivationType type, void*) {
  run_tile_kernel(a, kEpilogueSharedFloats, [&](const HostBlock& block, int b, int chunk, int tile, float* shared) {
    if (type == ActivationType::kFloat32) mixer_epilogue_block<float>(block, a, b, chunk, tile, shared);
    else mixer_epilogue_block<BFloat16>(block, a, b, chunk, tile, shared);
  });
}

void mixer_epilogue_backward(const MixerArgs& a, ActivationType type, void*) {
  run_tile_kernel(a, kEpilogueBackwardSharedFloats,
                  [&](const HostBlock& block, int b, int chunk, int tile, float* shared) {
                    if (type == ActivationType::kFloat32)
                      mixer_epilogue_backward_block<float>(block, a, b, chunk, tile, shared);
                    else mixer_epilogue_backward_block<BFloat16>(block, a, b, chunk, tile, shared);
                  });
}

void mixer_prologue_backward(const MixerArgs& a, ActivationType type, void*) {
  run_tile_kernel(a, kPrologueBackwardSharedFloats,
                  [&](const HostBlock& block, int b, int chunk, int tile, float* shared) {
                    if (type == ActivationType::kFloat32)
                      mixer_prologue_backward_block<float>(block, a, b, chunk, tile, shared);
                    else mixer_prologue_backward_block<BFloat16>(block, a, b, chunk, tile, shared);
                  });
}

void fft_conv_forward(const FftConvArgs& a, ActivationType rows, void*) {
  BlockEmulator emulator(fft_conv_threads(a.log2_p));
  const int64_t shared_floats = fft_conv_shared_bytes(a.length, a.log2_p, false) / sizeof(float);
  for (int channel = 0; channel < a.channels; ++channel)
    for (int b = 0; b < a.batch; ++b) {
      std::vector<float> shared = poisoned_shared(shared_floats);
      emulator.run([&](const HostBlock& block) {
        if (rows == ActivationType::kFloat32) fft_conv_forward_row<float>(block, a, channel, b, shared.data());
        else fft_conv_forward_row<BFloat16>(block, a, channel, b, shared.data());
      });
    }
}

void fft_conv_backward(const FftConvArgs& a, ActivationType rows, void*) {
  BlockEmulator emulator(fft_conv_threads(a.log2_p));
  const int64_t shared_floats = fft_conv_shared_bytes(a.length, a.log2_p, true) / sizeof(float);
  for (int channel = 0; channel < a.channels; ++channel) {
    std::vector<float> shared = poisoned_shared(shared_floats);
    emulator.run([&](const HostBlock& block) {
      if (rows == ActivationType::kFloat32) fft_conv_backward_channel<float>(block, a, channel, shared.data());
      else fft_conv_backward_channel<BFloat16>(block, a, channel, shared.data());
    });
  }
}

// Elementwise: a few emulated blocks in a grid-stride loop (no barriers, so no fibers needed).
void gelu_gate_forward(const GeluGateArgs& a, ActivationType type, void*) {
  constexpr int kThreads = 3 * kGeluGateThreads;  // three blocks' worth, so that the loop strides
  for (int t = 0; t < kThreads; ++t) {
    if (type == ActivationType::kFloat32) gelu_gate_forward_elements<float>(a, t, kThreads);
    else gelu_gate_forward_elements<BFloat16>(a, t, kThreads);
  }
}

void gelu_gate_backward(const GeluGateArgs& a, ActivationType type, void*) {
  constexpr int kThreads = 3 * kGeluGateThreads;
  for (int t = 0; t < kThreads; ++t) {
    if (type == ActivationType::kFloat32) gelu_gate_backward_elements<float>(a, t, kThreads);
    else gelu_gate_backward_elements<BFloat16>(a, t, kThreads);
  }
}

}  // namespace m2
