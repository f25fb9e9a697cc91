// The elementwise parts of the sequence mixer, fused around the long convolutions: the causal width-3
// depthwise short convolution, the gates, the padding mask and the D skip terms, forward and backward.
//
// Per (batch b, channel h < H, position t), with p_c the input projection's channel c, keep the mask:
//   x1 = conv3(p_h), x2 = conv3(p_{H+h}), z = conv3(p_{2H+h}),  conv3(p)[t] = w0 p[t-2] + w1 p[t-1] + w2 p[t] + b
//   v = z x1 keep,  r = u keep                                        (the two long-convolution inputs)
//   y = (conv(v) + D v) x2 + conv_res(r) + D_res r
// Activations (the projection, the layer input, y and their gradients) have any strides and are read and
// written channel-fastest, which is coalesced for the channels-last views the model passes; the
// long-convolution rows are (batch, channels, length), stored in the activations' type (where the
// PyTorch reference rounds too), and are read and written time-fastest. Arithmetic is fp32. A block
// moves a tile of 32 positions x 32 channels through shared memory to switch between the two.
#pragma once

#include "common.cuh"

namespace m2 {

constexpr int kTileTime = 32;
constexpr int kTileChannels = 32;
constexpr int kTileStride = kTileChannels + 1;  // one padding column avoids bank conflicts on transposed reads
constexpr int kMixerThreads = 256;
constexpr int kMaxChunksPerRow = 64;
// Per-channel sums the backward pass reduces: for each of x1, x2, z the three tap gradients and the bias
// gradient (rows 4c .. 4c+3), then D (row 12) and D_res (row 13).
constexpr int kPartialRows = 14;

// A (batch, channels, length) tensor with element strides.
struct StridedTensor {
  void* data;
  int64_t stride_batch;
  int64_t stride_channel;
  int64_t stride_time;
};

struct MixerArgs {
  StridedTensor projected;         // (B, 3H, L) input projection
  StridedTensor layer_input;       // (B, H, L) u; data null without the residual convolution
  StridedTensor y;                 // forward output (B, H, L)
  StridedTensor grad_y;            // backward input (B, H, L)
  StridedTensor grad_projected;    // backward output (B, 3H, L)
  StridedTensor grad_layer_input;  // backward output (B, H, L); data null without the residual convolution
  const float* keep;               // (B, L) 0/1 mask, or null
  const float* weight;             // (3H, 3) short-convolution taps
  const float* bias;               // (3H,)
  const float* d_skip;             // (H,)
  const float* residual_d_skip;    // (H,), null without the residual convolution
  void* conv_input;                // (B, C, L): rows [0, H) v, rows [H, 2H) r; C = 2H, or H without residual
  void* conv_output;               // (B, C, L): their long convolutions
  void* conv_grad_output;          // (B, C, L): gradient of conv_output
  void* conv_grad_input;           // (B, C, L): gradient of conv_input through the convolutions alone
  float* partials;                 // (B * chunks, kPartialRows, H) per-block sums of the backward pass
  int batch;
  int hidden;
  int length;
  int chunk_length;  // positions per block, a multiple of kTileTime
  int chunks;        // blocks along the length
  bool residual;
};

// How the tile kernels split (b, t, h): `chunks` blocks of `chunk_length` positions along the length
// (at most kMaxChunksPerRow, so the partial sums stay small), `channel_tiles` along the channels.
struct TileGrid {
  int chunks;
  int chunk_length;
  int channel_tiles;
};

M2_HD TileGrid mixer_tile_grid(int hidden, int length) {
  const int time_tiles = (length + kTileTime - 1) / kTileTime;
  const int tiles_per_chunk = (time_tiles + kMaxChunksPerRow - 1) / kMaxChunksPerRow;
  const int chunk_length = tiles_per_chunk * kTileTime;
  return {(length + chunk_length - 1) / chunk_length, chunk_length, (hidden + kTileChannels - 1) / kTileChannels};
}

// Shared-memory floats of each tile kernel.
constexpr int kPrologueSharedFloats = (2 * (kTileTime + 2) + kTileTime) * kTileStride;
constexpr int kEpilogueSharedFloats = (kTileTime + 2 + 4 * kTileTime) * kTileStride;
constexpr int kEpilogueBackwardSharedFloats = (kTileTime + 2 + kTileTime) * kTileStride;
constexpr int kPrologueBackwardSharedFloats =
    (3 * (kTileTime + 4) + 6 * (kTileTime + 2) + 4 * kTileTime) * kTileStride + (kTileTime + 2) +
    kPartialRows * kTileChannels;

namespace tile_detail {

template <class Act>
M2_HD float load(const StridedTensor& x, int b, int c, int t) {
  return to_float(static_cast<const Act*>(x.data)[b * x.stride_batch + c * x.stride_channel + t * x.stride_time]);
}

template <class Act>
M2_HD void store(const StridedTensor& x, int b, int c, int t, float value) {
  static_cast<Act*>(x.data)[b * x.stride_batch + c * x.stride_channel + t * x.stride_time] = from_float<Act>(value);
}

M2_HD int64_t row_offset(const MixerArgs& a, int b, int conv_channel) {
  const int conv_channels = a.residual ? 2 * a.hidden : a.hidden;
  return (static_cast<int64_t>(b) * conv_channels + conv_channel) * a.length;
}

// Short convolution at tile row `row` of a tile whose row 0 is position t0 - 2.
M2_HD float short_conv(const float* tile, int row, int col, const float* taps, float bias) {
  return taps[0] * tile[row * kTileStride + col] + taps[1] * tile[(row + 1) * kTileStride + col] +
         taps[2] * tile[(row + 2) * kTileStride + col] + bias;
}

// tile[row][col] = channel `channel_offset + h0 + col` of x at position t0 + row - halo, 0 outside.
template <class Act, class Block>
M2_DEVICE void load_activation_tile(const Block& block, const StridedTensor& x, int b, int channel_offset, int h0,
                                    int hidden, int t_first, int rows, int length, float* tile) {
  for (int i = block.thread(); i < rows * kTileChannels; i += block.size()) {
    const int row = i / kTileChannels;
    const int col = i % kTileChannels;
    const int t = t_first + row;
    const bool inside = h0 + col < hidden && t >= 0 && t < length;
    tile[row * kTileStride + col] = inside ? load<Act>(x, b, channel_offset + h0 + col, t) : 0.f;
  }
}

// tile[row][col] = conv row (b, channel_offset + h0 + col) at position t_first + row, 0 outside.
template <class Act, class Block>
M2_DEVICE void load_row_tile(const Block& block, const MixerArgs& a, const void* rows_base, int b,
                             int channel_offset, int h0, int t_first, int rows, float* tile) {
  for (int i = block.thread(); i < rows * kTileChannels; i += block.size()) {
    const int col = i / rows;
    const int row = i % rows;
    const int t = t_first + row;
    const bool inside = h0 + col < a.hidden && t < a.length;
    const Act* base = static_cast<const Act*>(rows_base);
    tile[row * kTileStride + col] = inside ? to_float(base[row_offset(a, b, channel_offset + h0 + col) + t]) : 0.f;
  }
}

}  // namespace tile_detail

// Forward, before the convolutions: conv_input rows v and r for positions [chunk start, chunk end).
template <class Act, class Block>
M2_DEVICE void mixer_prologue_block(const Block& block, const MixerArgs& a, int b, int chunk, int channel_tile,
                                    float* shared) {
  using namespace tile_detail;
  float* x1_in = shared;                               // (kTileTime + 2) rows from t0 - 2
  float* z_in = x1_in + (kTileTime + 2) * kTileStride;  // (kTileTime + 2) rows from t0 - 2
  float* u_in = z_in + (kTileTime + 2) * kTileStride;   // kTileTime rows from t0
  const int hidden = a.hidden;
  const int h0 = channel_tile * kTileChannels;
  const int chunk_end = (chunk + 1) * a.chunk_length < a.length ? (chunk + 1) * a.chunk_length : a.length;
  for (int t0 = chunk * a.chunk_length; t0 < chunk_end; t0 += kTileTime) {
    load_activation_tile<Act>(block, a.projected, b, 0, h0, hidden, t0 - 2, kTileTime + 2, a.length, x1_in);
    load_activation_tile<Act>(block, a.projected, b, 2 * hidden, h0, hidden, t0 - 2, kTileTime + 2, a.length, z_in);
    if (a.residual) load_activation_tile<Act>(block, a.layer_input, b, 0, h0, hidden, t0, kTileTime, a.length, u_in);
    block.sync();
    for (int i = block.thread(); i < kTileTime * kTileChannels; i += block.size()) {
      const int col = i / kTileTime;
      const int row = i % kTileTime;
      const int h = h0 + col;
      const int t = t0 + row;
      if (h >= hidden || t >= a.length) continue;
      const float keep = a.keep ? a.keep[static_cast<int64_t>(b) * a.length + t] : 1.f;
      const float x1 = short_conv(x1_in, row, col, a.weight + 3 * h, a.bias[h]);
      const float z = short_conv(z_in, row, col, a.weight + 3 * (2 * hidden + h), a.bias[2 * hidden + h]);
      Act* conv_input = static_cast<Act*>(a.conv_input);
      conv_input[row_offset(a, b, h) + t] = from_float<Act>(z * x1 * keep);
      if (a.residual)
        conv_input[row_offset(a, b, hidden + h) + t] = from_float<Act>(u_in[row * kTileStride + col] * keep);
    }
    block.sync();
  }
}

// Forward, after the convolutions: y = (conv(v) + D v) x2 + conv_res(r) + D_res r.
template <class Act, class Block>
M2_DEVICE void mixer_epilogue_block(const Block& block, const MixerArgs& a, int b, int chunk, int channel_tile,
                                    float* shared) {
  using namespace tile_detail;
  float* x2_in = shared;                               // (kTileTime + 2) rows from t0 - 2
  float* v = x2_in + (kTileTime + 2) * kTileStride;    // kTileTime rows from t0, each
  float* conv_v = v + kTileTime * kTileStride;
  float* r = conv_v + kTileTime * kTileStride;
  float* conv_r = r + kTileTime * kTileStride;
  const int hidden = a.hidden;
  const int h0 = channel_tile * kTileChannels;
  const int chunk_end = (chunk + 1) * a.chunk_length < a.length ? (chunk + 1) * a.chunk_length : a.length;
  for (int t0 = chunk * a.chunk_length; t0 < chunk_end; t0 += kTileTime) {
    load_activation_tile<Act>(block, a.projected, b, hidden, h0, hidden, t0 - 2, kTileTime + 2, a.length, x2_in);
    load_row_tile<Act>(block, a, a.conv_input, b, 0, h0, t0, kTileTime, v);
    load_row_tile<Act>(block, a, a.conv_output, b, 0, h0, t0, kTileTime, conv_v);
    if (a.residual) {
      load_row_tile<Act>(block, a, a.conv_input, b, hidden, h0, t0, kTileTime, r);
      load_row_tile<Act>(block, a, a.conv_output, b, hidden, h0, t0, kTileTime, conv_r);
    }
    block.sync();
    for (int i = block.thread(); i < kTileTime * kTileChannels; i += block.size()) {
      const int row = i / kTileChannels;
      const int col = i % kTileChannels;
      const int h = h0 + col;
      const int t = t0 + row;
      if (h >= hidden || t >= a.length) continue;
      const int at = row * kTileStride + col;
      const float x2 = short_conv(x2_in, row, col, a.weight + 3 * (hidden + h), a.bias[hidden + h]);
      float y = (conv_v[at] + a.d_skip[h] * v[at]) * x2;
      if (a.residual) y += conv_r[at] + a.residual_d_skip[h] * r[at];
      store<Act>(a.y, b, h, t, y);
    }
    block.sync();
  }
}

// Backward, before the convolutions' backward: conv_grad_output rows dy x2 (for v) and dy (for r).
template <class Act, class Block>
M2_DEVICE void mixer_epilogue_backward_block(const Block& block, const MixerArgs& a, int b, int chunk,
                                             int channel_tile, float* shared) {
  using namespace tile_detail;
  float* x2_in = shared;                             // (kTileTime + 2) rows from t0 - 2
  float* dy = x2_in + (kTileTime + 2) * kTileStride;  // kTileTime rows from t0
  const int hidden = a.hidden;
  const int h0 = channel_tile * kTileChannels;
  const int chunk_end = (chunk + 1) * a.chunk_length < a.length ? (chunk + 1) * a.chunk_length : a.length;
  for (int t0 = chunk * a.chunk_length; t0 < chunk_end; t0 += kTileTime) {
    load_activation_tile<Act>(block, a.projected, b, hidden, h0, hidden, t0 - 2, kTileTime + 2, a.length, x2_in);
    load_activation_tile<Act>(block, a.grad_y, b, 0, h0, hidden, t0, kTileTime, a.length, dy);
    block.sync();
    for (int i = block.thread(); i < kTileTime * kTileChannels; i += block.size()) {
      const int col = i / kTileTime;
      const int row = i % kTileTime;
      const int h = h0 + col;
      const int t = t0 + row;
      if (h >= hidden || t >= a.length) continue;
      const float x2 = short_conv(x2_in, row, col, a.weight + 3 * (hidden + h), a.bias[hidden + h]);
      const float grad = dy[row * kTileStride + col];
      Act* conv_grad_output = static_cast<Act*>(a.conv_grad_output);
      conv_grad_output[row_offset(a, b, h) + t] = from_float<Act>(grad * x2);
      if (a.residual) conv_grad_output[row_offset(a, b, hidden + h) + t] = from_float<Act>(grad);
    }
    block.sync();
  }
}

// Backward, after the convolutions' backward: the gradients of the projection and the layer input, and
// this block's sums for the short-convolution taps and biases and the two D terms.
template <class Act, class Block>
M2_DEVICE void mixer_prologue_backward_block(const Block& block, const MixerArgs& a, int b, int chunk,
                                             int channel_tile, float* shared) {
  using namespace tile_detail;
  constexpr int kInRows = kTileTime + 4;    // projection rows from t0 - 2: inputs of positions t0 .. t0 + T + 1
  constexpr int kHaloRows = kTileTime + 2;  // rows from t0: the tile and the two positions dp[t] also needs
  // Tiles of x1's, x2's and z's inputs and gradients, one after another: channel c's at c * its size.
  constexpr int kInTile = kInRows * kTileStride;
  constexpr int kHaloTile = kHaloRows * kTileStride;
  float* p_in = shared;                 // 3 tiles of kInRows rows from t0 - 2
  float* dy = p_in + 3 * kInTile;       // kHaloRows rows from t0, each
  float* conv_v = dy + kHaloTile;
  float* conv_grad_v = conv_v + kHaloTile;
  float* dx = conv_grad_v + kHaloTile;  // 3 tiles of kHaloRows rows: gradients of x1, x2, z
  float* conv_grad_r = dx + 3 * kHaloTile;
  float* r = conv_grad_r + kTileTime * kTileStride;
  float* d_term = r + kTileTime * kTileStride;                // dy x2 v per position: the D gradient
  float* residual_d_term = d_term + kTileTime * kTileStride;  // dy r per position: the D_res gradient
  float* keep = residual_d_term + kTileTime * kTileStride;    // kHaloRows
  float* sums = keep + kHaloRows;  // (kPartialRows, kTileChannels): this block's sums over its chunk
  const int hidden = a.hidden;
  const int h0 = channel_tile * kTileChannels;
  const int chunk_end = (chunk + 1) * a.chunk_length < a.length ? (chunk + 1) * a.chunk_length : a.length;

  for (int i = block.thread(); i < kPartialRows * kTileChannels; i += block.size()) sums[i] = 0.f;
  for (int t0 = chunk * a.chunk_length; t0 < chunk_end; t0 += kTileTime) {
    for (int c = 0; c < 3; ++c)
      load_activation_tile<Act>(block, a.projected, b, c * hidden, h0, hidden, t0 - 2, kInRows, a.length,
                                p_in + c * kInTile);
    load_activation_tile<Act>(block, a.grad_y, b, 0, h0, hidden, t0, kHaloRows, a.length, dy);
    load_row_tile<Act>(block, a, a.conv_output, b, 0, h0, t0, kHaloRows, conv_v);
    load_row_tile<Act>(block, a, a.conv_grad_input, b, 0, h0, t0, kHaloRows, conv_grad_v);
    if (a.residual) {
      load_row_tile<Act>(block, a, a.conv_grad_input, b, hidden, h0, t0, kTileTime, conv_grad_r);
      load_row_tile<Act>(block, a, a.conv_input, b, hidden, h0, t0, kTileTime, r);
    }
    for (int row = block.thread(); row < kHaloRows; row += block.size()) {
      const int t = t0 + row;
      keep[row] = t >= a.length ? 0.f : (a.keep ? a.keep[static_cast<int64_t>(b) * a.length + t] : 1.f);
    }
    block.sync();

    for (int i = block.thread(); i < kHaloRows * kTileChannels; i += block.size()) {
      const int row = i / kTileChannels;
      const int col = i % kTileChannels;
      const int h = h0 + col;
      const int t = t0 + row;
      const int at = row * kTileStride + col;
      if (h >= hidden || t >= a.length) {
        dx[at] = dx[kHaloTile + at] = dx[2 * kHaloTile + at] = 0.f;
        if (row < kTileTime) d_term[at] = residual_d_term[at] = 0.f;
        continue;
      }
      const float x1 = short_conv(p_in, row, col, a.weight + 3 * h, a.bias[h]);
      const float x2 = short_conv(p_in + kInTile, row, col, a.weight + 3 * (hidden + h), a.bias[hidden + h]);
      const float z =
          short_conv(p_in + 2 * kInTile, row, col, a.weight + 3 * (2 * hidden + h), a.bias[2 * hidden + h]);
      const float v = to_float(from_float<Act>(z * x1 * keep[row]));  // as rounded into conv_input
      const float grad = dy[at];
      const float grad_conv_v = grad * x2;                      // gradient of conv(v) + D v
      const float grad_v = conv_grad_v[at] + a.d_skip[h] * grad_conv_v;
      dx[at] = grad_v * z * keep[row];
      dx[kHaloTile + at] = grad * (conv_v[at] + a.d_skip[h] * v);
      dx[2 * kHaloTile + at] = grad_v * x1 * keep[row];
      if (row < kTileTime) {
        d_term[at] = grad_conv_v * v;
        residual_d_term[at] = a.residual ? grad * r[at] : 0.f;
        if (a.residual)
          store<Act>(a.grad_layer_input, b, h, t, (conv_grad_r[at] + a.residual_d_skip[h] * grad) * keep[row]);
      }
    }
    block.sync();

    for (int i = block.thread(); i < 3 * kTileTime * kTileChannels; i += block.size()) {
      const int c = i / (kTileTime * kTileChannels);
      const int row = (i / kTileChannels) % kTileTime;
      const int col = i % kTileChannels;
      const int h = h0 + col;
      const int t = t0 + row;
      if (h >= hidden || t >= a.length) continue;
      const float* taps = a.weight + 3 * (c * hidden + h);
      const float* grad = dx + c * kHaloTile + col;
      const float grad_p = taps[2] * grad[row * kTileStride] + taps[1] * grad[(row + 1) * kTileStride] +
                           taps[0] * grad[(row + 2) * kTileStride];
      store<Act>(a.grad_projected, b, c * hidden + h, t, grad_p);
    }
    for (int i = block.thread(); i < kPartialRows * kTileChannels; i += block.size()) {
      const int quantity = i / kTileChannels;
      const int col = i % kTileChannels;
      float sum = 0.f;
      if (quantity < 12) {
        const int c = quantity / 4;
        const int tap = quantity % 4;  // 0..2: weight taps, 3: bias
        const float* grad = dx + c * kHaloTile + col;
        const float* input = p_in + c * kInTile + col;
        for (int row = 0; row < kTileTime; ++row)
          sum += tap == 3 ? grad[row * kTileStride] : grad[row * kTileStride] * input[(row + tap) * kTileStride];
      } else {
        const float* term = quantity == 12 ? d_term : residual_d_term;
        for (int row = 0; row < kTileTime; ++row) sum += term[row * kTileStride + col];
      }
      sums[i] += sum;
    }
    block.sync();
  }
  for (int i = block.thread(); i < kPartialRows * kTileChannels; i += block.size()) {
    const int quantity = i / kTileChannels;
    const int h = h0 + i % kTileChannels;
    if (h >= hidden) continue;
    a.partials[((static_cast<int64_t>(b) * a.chunks + chunk) * kPartialRows + quantity) * hidden + h] = sums[i];
  }
}

}  // namespace m2
