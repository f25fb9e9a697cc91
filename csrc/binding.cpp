// PyTorch binding of the Monarch Mixer kernels: argument checks, buffers, and the order of launches.
// Built twice from this file: for CUDA with kernels.cu, and (with M2_HOST_EMULATION defined) for the CPU
// with host_emulation.cpp, which runs the same kernel bodies on CPU tensors for the tests.
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

#include "kernels.h"

#if !defined(M2_HOST_EMULATION)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

using torch::Tensor;
using OptionalTensor = std::optional<Tensor>;

#if defined(M2_HOST_EMULATION)
constexpr bool kEmulated = true;
#else
constexpr bool kEmulated = false;
#endif

void check_device(const Tensor& tensor, const Tensor& reference, const char* name) {
  if (kEmulated) {
    TORCH_CHECK(tensor.device().is_cpu(), name, " must be on the CPU (host emulation)");
  } else {
    TORCH_CHECK(tensor.is_cuda(), name, " must be a CUDA tensor");
  }
  TORCH_CHECK(tensor.device() == reference.device(), name, " is on ", tensor.device(), ", expected ",
              reference.device());
}

void check_fp32(const Tensor& tensor, const Tensor& reference, const char* name, std::vector<int64_t> shape) {
  check_device(tensor, reference, name);
  TORCH_CHECK(tensor.scalar_type() == torch::kFloat32, name, " must be float32");
  TORCH_CHECK(tensor.sizes() == torch::IntArrayRef(shape), name, " has shape ", tensor.sizes(), ", expected ",
              torch::IntArrayRef(shape));
  TORCH_CHECK(tensor.is_contiguous(), name, " must be contiguous");
}

void check_spectrum(const Tensor& spectrum, const Tensor& reference, const char* name, int64_t rows, int log2_n) {
  check_device(spectrum, reference, name);
  TORCH_CHECK(spectrum.scalar_type() == torch::kComplexFloat, name, " must be complex64");
  TORCH_CHECK(!spectrum.is_conj(), name, " must not be a lazily conjugated view (call resolve_conj())");
  const int64_t bins = (int64_t{1} << (log2_n - 1)) + 1;
  TORCH_CHECK(spectrum.dim() == 2 && spectrum.size(0) == rows && spectrum.size(1) == bins, name, " has shape ",
              spectrum.sizes(), ", expected (", rows, ", ", bins, ")");
  TORCH_CHECK(spectrum.is_contiguous(), name, " must be contiguous");
}

// log2 of the transform size n from the twiddle table (n entries), which must be a power of two.
int transform_log2(const Tensor& twiddles, const Tensor& reference, int64_t length) {
  check_device(twiddles, reference, "twiddles");
  TORCH_CHECK(twiddles.scalar_type() == torch::kComplexFloat && twiddles.dim() == 1 && twiddles.is_contiguous(),
              "twiddles must be a contiguous complex64 vector");
  const int64_t n = twiddles.size(0);
  TORCH_CHECK(n >= 128 && n <= 65536 && (n & (n - 1)) == 0, "transform size ", n,
              " must be a power of two in [128, 65536]");
  TORCH_CHECK(length >= 1 && 2 * length <= n, "length ", length, " needs a transform size of at least ", 2 * length,
              ", got ", n);
  int log2_n = 0;
  while ((int64_t{1} << log2_n) < n) ++log2_n;
  return log2_n;
}

// The sub-problem size: `requested` (> 0) or the largest that fits the device.
int subproblem_log2(int requested, int log2_n, int64_t length, bool backward) {
  const int log2_p = requested > 0 ? requested
                                   : m2::choose_fft_conv_log2_p(log2_n, static_cast<int>(length), backward,
                                                                m2::max_shared_bytes_per_block());
  TORCH_CHECK(log2_p >= 4 && log2_p <= log2_n - 1, "no usable sub-problem size for transform size 2^", log2_n,
              " (got 2^", log2_p, ")");
  const int64_t bytes = m2::fft_conv_shared_bytes(static_cast<int>(length), log2_p, backward);
  TORCH_CHECK(bytes <= m2::max_shared_bytes_per_block(), "the long convolution of length ", length, " needs ", bytes,
              " bytes of shared memory per block; this device allows ", m2::max_shared_bytes_per_block());
  return log2_p;
}

// Fresh buffers; the emulation fills them with NaN so that an element no kernel writes is caught.
Tensor new_buffer(torch::IntArrayRef sizes, const torch::TensorOptions& options) {
  if (kEmulated) return torch::full(sizes, std::numeric_limits<float>::quiet_NaN(), options);
  return torch::empty(sizes, options);
}

void* current_stream(const Tensor& reference) {
#if defined(M2_HOST_EMULATION)
  (void)reference;
  return nullptr;
#else
  return c10::cuda::getCurrentCUDAStream(reference.device().index()).stream();
#endif
}

m2::StridedTensor strided(const Tensor& tensor) {
  return {tensor.data_ptr(), tensor.stride(0), tensor.stride(1), tensor.stride(2)};
}

m2::ActivationType activation_type(const Tensor& tensor) {
  return tensor.scalar_type() == torch::kFloat32 ? m2::ActivationType::kFloat32 : m2::ActivationType::kBFloat16;
}

m2::StridedTensor no_tensor() { return {nullptr, 0, 0, 0}; }

const m2::Complex* complex_data(const Tensor& tensor) {
  return reinterpret_cast<const m2::Complex*>(tensor.data_ptr<c10::complex<float>>());
}

m2::Complex* mutable_complex_data(Tensor& tensor) {
  return reinterpret_cast<m2::Complex*>(tensor.data_ptr<c10::complex<float>>());
}

// Everything the mixer kernels share, checked.
struct MixerProblem {
  int64_t batch, hidden, length;
  bool residual;
  int log2_n;
  m2::ActivationType type;
  m2::TileGrid grid;
};

MixerProblem check_mixer_inputs(const Tensor& projected, const OptionalTensor& layer_input, const Tensor& weight,
                                const Tensor& bias, const Tensor& spectrum, const Tensor& d_skip,
                                const OptionalTensor& residual_spectrum, const OptionalTensor& residual_d_skip,
                                const OptionalTensor& keep, const Tensor& twiddles) {
  check_device(projected, projected, "projected");
  TORCH_CHECK(projected.dim() == 3 && projected.size(1) % 3 == 0, "projected must be (batch, 3 * hidden, length)");
  TORCH_CHECK(projected.scalar_type() == torch::kFloat32 || projected.scalar_type() == torch::kBFloat16,
              "activations must be float32 or bfloat16, got ", projected.scalar_type());
  MixerProblem problem;
  problem.batch = projected.size(0);
  problem.hidden = projected.size(1) / 3;
  problem.length = projected.size(2);
  TORCH_CHECK(problem.batch >= 1 && problem.batch <= 65535, "batch must be in [1, 65535]");
  problem.residual = residual_spectrum.has_value();
  TORCH_CHECK(layer_input.has_value() == problem.residual && residual_d_skip.has_value() == problem.residual,
              "layer_input, residual_spectrum and residual_d_skip come together");
  problem.log2_n = transform_log2(twiddles, projected, problem.length);
  problem.type = activation_type(projected);
  const int64_t h = problem.hidden;
  check_fp32(weight, projected, "weight", {3 * h, 3});
  check_fp32(bias, projected, "bias", {3 * h});
  check_spectrum(spectrum, projected, "spectrum", h, problem.log2_n);
  check_fp32(d_skip, projected, "d_skip", {h});
  if (problem.residual) {
    check_device(*layer_input, projected, "layer_input");
    TORCH_CHECK(layer_input->scalar_type() == projected.scalar_type(), "layer_input must have projected's dtype");
    TORCH_CHECK(layer_input->sizes() == torch::IntArrayRef({problem.batch, h, problem.length}),
                "layer_input must be (batch, hidden, length)");
    check_spectrum(*residual_spectrum, projected, "residual_spectrum", h, problem.log2_n);
    check_fp32(*residual_d_skip, projected, "residual_d_skip", {h});
  }
  if (keep) check_fp32(*keep, projected, "keep", {problem.batch, problem.length});
  problem.grid = m2::mixer_tile_grid(static_cast<int>(h), static_cast<int>(problem.length));
  return problem;
}

m2::MixerArgs mixer_args(const MixerProblem& problem, const Tensor& projected, const OptionalTensor& layer_input,
                         const Tensor& weight, const Tensor& bias, const Tensor& d_skip,
                         const OptionalTensor& residual_d_skip, const OptionalTensor& keep) {
  m2::MixerArgs a{};
  a.projected = strided(projected);
  a.layer_input = problem.residual ? strided(*layer_input) : no_tensor();
  a.y = a.grad_y = a.grad_projected = a.grad_layer_input = no_tensor();
  a.keep = keep ? keep->data_ptr<float>() : nullptr;
  a.weight = weight.data_ptr<float>();
  a.bias = bias.data_ptr<float>();
  a.d_skip = d_skip.data_ptr<float>();
  a.residual_d_skip = problem.residual ? residual_d_skip->data_ptr<float>() : nullptr;
  a.batch = static_cast<int>(problem.batch);
  a.hidden = static_cast<int>(problem.hidden);
  a.length = static_cast<int>(problem.length);
  a.chunk_length = problem.grid.chunk_length;
  a.chunks = problem.grid.chunks;
  a.residual = problem.residual;
  return a;
}

m2::FftConvArgs conv_args(const MixerProblem& problem, const Tensor& spectrum, const OptionalTensor& residual_spectrum,
                          const Tensor& twiddles, int log2_p) {
  m2::FftConvArgs c{};
  c.spectrum = complex_data(spectrum);
  c.second_spectrum = problem.residual ? complex_data(*residual_spectrum) : nullptr;
  c.twiddles = complex_data(twiddles);
  c.batch = static_cast<int>(problem.batch);
  c.channels = static_cast<int>(problem.residual ? 2 * problem.hidden : problem.hidden);
  c.split = static_cast<int>(problem.hidden);
  c.length = static_cast<int>(problem.length);
  c.log2_n = problem.log2_n;
  c.log2_p = log2_p;
  return c;
}

// Channels-last storage seen as (batch, channels, length), the layout the model's projections use.
Tensor new_activation(const MixerProblem& problem, int64_t channels, const Tensor& like) {
  return new_buffer({problem.batch, problem.length, channels}, like.options()).transpose(1, 2);
}

// (y, conv_output): y (B, H, L) and the long-convolution outputs (B, C, L) that backward() needs.
std::tuple<Tensor, Tensor> mixer_forward(const Tensor& projected, const OptionalTensor& layer_input,
                                         const Tensor& weight, const Tensor& bias, const Tensor& spectrum,
                                         const Tensor& d_skip, const OptionalTensor& residual_spectrum,
                                         const OptionalTensor& residual_d_skip, const OptionalTensor& keep,
                                         const Tensor& twiddles, int64_t log2_p) {
  const MixerProblem problem = check_mixer_inputs(projected, layer_input, weight, bias, spectrum, d_skip,
                                                  residual_spectrum, residual_d_skip, keep, twiddles);
#if !defined(M2_HOST_EMULATION)
  const c10::cuda::CUDAGuard guard(projected.device());
#endif
  void* stream = current_stream(projected);
  const int64_t conv_channels = problem.residual ? 2 * problem.hidden : problem.hidden;
  // The convolution rows are kept in the activations' dtype: the PyTorch path rounds there too.
  Tensor conv_input = new_buffer({problem.batch, conv_channels, problem.length}, projected.options());
  Tensor conv_output = new_buffer({problem.batch, conv_channels, problem.length}, projected.options());
  Tensor y = new_activation(problem, problem.hidden, projected);

  m2::MixerArgs a = mixer_args(problem, projected, layer_input, weight, bias, d_skip, residual_d_skip, keep);
  a.conv_input = conv_input.data_ptr();
  a.conv_output = conv_output.data_ptr();
  a.y = strided(y);
  m2::mixer_prologue(a, problem.type, stream);

  m2::FftConvArgs c = conv_args(problem, spectrum, residual_spectrum, twiddles,
                                subproblem_log2(static_cast<int>(log2_p), problem.log2_n, problem.length, false));
  c.input = conv_input.data_ptr();
  c.output = conv_output.data_ptr();
  m2::fft_conv_forward(c, problem.type, stream);

  m2::mixer_epilogue(a, problem.type, stream);
  return {y, conv_output};
}

// Gradients of mixer_forward's inputs: (projected, layer_input or None, weight, bias, spectrum, d_skip,
// residual_spectrum or None, residual_d_skip or None).
std::vector<OptionalTensor> mixer_backward(const Tensor& grad_y, const Tensor& projected,
                                           const OptionalTensor& layer_input, const Tensor& weight,
                                           const Tensor& bias, const Tensor& spectrum, const Tensor& d_skip,
                                           const OptionalTensor& residual_spectrum,
                                           const OptionalTensor& residual_d_skip, const OptionalTensor& keep,
                                           const Tensor& twiddles, const Tensor& conv_output, int64_t log2_p) {
  const MixerProblem problem = check_mixer_inputs(projected, layer_input, weight, bias, spectrum, d_skip,
                                                  residual_spectrum, residual_d_skip, keep, twiddles);
  check_device(grad_y, projected, "grad_y");
  TORCH_CHECK(grad_y.scalar_type() == projected.scalar_type(), "grad_y must have projected's dtype");
  TORCH_CHECK(grad_y.sizes() == torch::IntArrayRef({problem.batch, problem.hidden, problem.length}),
              "grad_y must be (batch, hidden, length)");
  const int64_t conv_channels = problem.residual ? 2 * problem.hidden : problem.hidden;
  check_device(conv_output, projected, "conv_output");
  TORCH_CHECK(conv_output.scalar_type() == projected.scalar_type() && conv_output.is_contiguous() &&
                  conv_output.sizes() == torch::IntArrayRef({problem.batch, conv_channels, problem.length}),
              "conv_output must be mixer_forward's second output");
#if !defined(M2_HOST_EMULATION)
  const c10::cuda::CUDAGuard guard(projected.device());
#endif
  void* stream = current_stream(projected);
  const auto fp32 = projected.options().dtype(torch::kFloat32);
  const int64_t h = problem.hidden;
  const auto rows = projected.options();
  Tensor conv_input = new_buffer({problem.batch, conv_channels, problem.length}, rows);
  Tensor conv_grad_output = new_buffer({problem.batch, conv_channels, problem.length}, rows);
  Tensor conv_grad_input = new_buffer({problem.batch, conv_channels, problem.length}, rows);
  Tensor grad_spectrum = new_buffer({h, spectrum.size(1)}, spectrum.options());
  Tensor grad_residual_spectrum =
      problem.residual ? new_buffer({h, spectrum.size(1)}, spectrum.options()) : Tensor();
  Tensor grad_projected = new_activation(problem, 3 * h, projected);
  Tensor grad_layer_input = problem.residual ? new_activation(problem, h, projected) : Tensor();
  Tensor partials = new_buffer({problem.batch * problem.grid.chunks, m2::kPartialRows, h}, fp32);

  m2::MixerArgs a = mixer_args(problem, projected, layer_input, weight, bias, d_skip, residual_d_skip, keep);
  a.grad_y = strided(grad_y);
  a.grad_projected = strided(grad_projected);
  a.grad_layer_input = problem.residual ? strided(grad_layer_input) : no_tensor();
  a.conv_input = conv_input.data_ptr();
  a.conv_output = conv_output.data_ptr();
  a.conv_grad_output = conv_grad_output.data_ptr();
  a.conv_grad_input = conv_grad_input.data_ptr();
  a.partials = partials.data_ptr<float>();
  m2::mixer_prologue(a, problem.type, stream);  // recomputes the convolution inputs instead of keeping them
  m2::mixer_epilogue_backward(a, problem.type, stream);

  m2::FftConvArgs c = conv_args(problem, spectrum, residual_spectrum, twiddles,
                                subproblem_log2(static_cast<int>(log2_p), problem.log2_n, problem.length, true));
  c.input = conv_input.data_ptr();
  c.grad_output = conv_grad_output.data_ptr();
  c.output = conv_grad_input.data_ptr();
  c.grad_spectrum = mutable_complex_data(grad_spectrum);
  c.grad_second_spectrum = problem.residual ? mutable_complex_data(grad_residual_spectrum) : nullptr;
  m2::fft_conv_backward(c, problem.type, stream);

  m2::mixer_prologue_backward(a, problem.type, stream);

  const Tensor sums = partials.sum(0);  // (kPartialRows, H)
  const Tensor per_channel = sums.narrow(0, 0, 12).view({3, 4, h}).permute({0, 2, 1}).reshape({3 * h, 4});
  std::vector<OptionalTensor> grads;
  grads.emplace_back(grad_projected);
  grads.emplace_back(problem.residual ? OptionalTensor(grad_layer_input) : std::nullopt);
  grads.emplace_back(per_channel.narrow(1, 0, 3).contiguous());
  grads.emplace_back(per_channel.select(1, 3).contiguous());
  grads.emplace_back(grad_spectrum);
  grads.emplace_back(sums.select(0, 12).contiguous());
  grads.emplace_back(problem.residual ? OptionalTensor(grad_residual_spectrum) : std::nullopt);
  grads.emplace_back(problem.residual ? OptionalTensor(sums.select(0, 13).contiguous()) : std::nullopt);
  return grads;
}

void check_rows(const Tensor& rows, const Tensor& reference, const char* name) {
  check_device(rows, reference, name);
  TORCH_CHECK(rows.dim() == 3 && rows.is_contiguous() &&
                  (rows.scalar_type() == torch::kFloat32 || rows.scalar_type() == torch::kBFloat16),
              name, " must be contiguous float32 or bfloat16 (batch, channels, length)");
  TORCH_CHECK(rows.sizes() == reference.sizes() && rows.scalar_type() == reference.scalar_type(), name,
              " must match input's shape and dtype");
}

m2::FftConvArgs single_spectrum_args(const Tensor& input, const Tensor& spectrum, const Tensor& twiddles,
                                     int64_t log2_p, bool backward) {
  const int log2_n = transform_log2(twiddles, input, input.size(2));
  check_spectrum(spectrum, input, "spectrum", input.size(1), log2_n);
  m2::FftConvArgs c{};
  c.input = input.data_ptr();
  c.spectrum = complex_data(spectrum);
  c.twiddles = complex_data(twiddles);
  c.batch = static_cast<int>(input.size(0));
  c.channels = c.split = static_cast<int>(input.size(1));
  c.length = static_cast<int>(input.size(2));
  c.log2_n = log2_n;
  c.log2_p = subproblem_log2(static_cast<int>(log2_p), log2_n, input.size(2), backward);
  return c;
}

// The long convolution alone, for rows (B, C, L) with one spectrum per channel (C, n/2 + 1).
Tensor conv_forward(const Tensor& input, const Tensor& spectrum, const Tensor& twiddles, int64_t log2_p) {
  check_rows(input, input, "input");
#if !defined(M2_HOST_EMULATION)
  const c10::cuda::CUDAGuard guard(input.device());
#endif
  m2::FftConvArgs c = single_spectrum_args(input, spectrum, twiddles, log2_p, false);
  Tensor output = new_buffer(input.sizes(), input.options());
  c.output = output.data_ptr();
  m2::fft_conv_forward(c, activation_type(input), current_stream(input));
  return output;
}

// Gradients of conv_forward: (input, spectrum).
std::tuple<Tensor, Tensor> conv_backward(const Tensor& input, const Tensor& grad_output, const Tensor& spectrum,
                                         const Tensor& twiddles, int64_t log2_p) {
  check_rows(input, input, "input");
  check_rows(grad_output, input, "grad_output");
#if !defined(M2_HOST_EMULATION)
  const c10::cuda::CUDAGuard guard(input.device());
#endif
  m2::FftConvArgs c = single_spectrum_args(input, spectrum, twiddles, log2_p, true);
  Tensor grad_input = new_buffer(input.sizes(), input.options());
  Tensor grad_spectrum = new_buffer(spectrum.sizes(), spectrum.options());
  c.grad_output = grad_output.data_ptr();
  c.output = grad_input.data_ptr();
  c.grad_spectrum = mutable_complex_data(grad_spectrum);
  m2::fft_conv_backward(c, activation_type(input), current_stream(input));
  return {grad_input, grad_spectrum};
}

m2::GeluGateArgs gelu_gate_args(const Tensor& gate_value) {
  check_device(gate_value, gate_value, "gate_value");
  TORCH_CHECK(gate_value.scalar_type() == torch::kFloat32 || gate_value.scalar_type() == torch::kBFloat16,
              "gate_value must be float32 or bfloat16");
  TORCH_CHECK(gate_value.dim() == 3 && gate_value.size(0) % 2 == 0 && gate_value.size(2) % 2 == 0,
              "gate_value must be (nblocks, rows, 2 * width) with an even number of blocks");
  TORCH_CHECK(gate_value.is_contiguous(), "gate_value must be contiguous");
  m2::GeluGateArgs g{};
  g.gate_value = gate_value.data_ptr();
  g.nblocks = static_cast<int>(gate_value.size(0));
  g.rows = gate_value.size(1);
  g.width = static_cast<int>(gate_value.size(2) / 2);
  return g;
}

// GELU(gate) * value from the first block-diagonal GEMM's (nblocks, rows, 2 width) output, as the
// (nblocks, rows, width) input of the second.
Tensor gelu_gate_forward(const Tensor& gate_value) {
  m2::GeluGateArgs g = gelu_gate_args(gate_value);
#if !defined(M2_HOST_EMULATION)
  const c10::cuda::CUDAGuard guard(gate_value.device());
#endif
  Tensor hidden = new_buffer({g.nblocks, g.rows, g.width}, gate_value.options());
  g.hidden = hidden.data_ptr();
  m2::gelu_gate_forward(g, activation_type(gate_value), current_stream(gate_value));
  return hidden;
}

// The gradient of gelu_gate_forward's input.
Tensor gelu_gate_backward(const Tensor& gate_value, const Tensor& grad_hidden) {
  m2::GeluGateArgs g = gelu_gate_args(gate_value);
  check_device(grad_hidden, gate_value, "grad_hidden");
  TORCH_CHECK(grad_hidden.scalar_type() == gate_value.scalar_type(), "grad_hidden must have gate_value's dtype");
  TORCH_CHECK(grad_hidden.sizes() == torch::IntArrayRef({g.nblocks, g.rows, g.width}) && grad_hidden.is_contiguous(),
              "grad_hidden must be contiguous (nblocks, rows, width)");
#if !defined(M2_HOST_EMULATION)
  const c10::cuda::CUDAGuard guard(gate_value.device());
#endif
  Tensor grad_gate_value = new_buffer(gate_value.sizes(), gate_value.options());
  g.grad_hidden = grad_hidden.data_ptr();
  g.grad_gate_value = grad_gate_value.data_ptr();
  m2::gelu_gate_backward(g, activation_type(gate_value), current_stream(gate_value));
  return grad_gate_value;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "Fused CUDA kernels of the Monarch Mixer sequence mixer (see docs/kernels.md)";
  module.def("mixer_forward", &mixer_forward, "Sequence-mixer core, forward: (y, conv_output)");
  module.def("mixer_backward", &mixer_backward, "Sequence-mixer core, backward: gradients of mixer_forward's inputs");
  module.def("conv_forward", &conv_forward, "Long convolution of float32 or bfloat16 rows by their spectra");
  module.def("conv_backward", &conv_backward, "Gradients (input, spectrum) of conv_forward");
  module.def("gelu_gate_forward", &gelu_gate_forward, "GELU(gate) * value between the block-diagonal GEMMs");
  module.def("gelu_gate_backward", &gelu_gate_backward, "Gradient of gelu_gate_forward's input");
  module.attr("host_emulation") = kEmulated;
#if defined(M2_HOST_EMULATION)
  module.def(
      "set_thread_order", [](int order) { m2::set_thread_order(static_cast<m2::ThreadOrder>(order)); },
      "Thread order of the emulation's barrier intervals: 0 forward, 1 reverse, 2 shuffled");
#endif
}
