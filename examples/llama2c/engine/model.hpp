// A llama2.c checkpoint: its shape and its float32 weights, loaded from the legacy (version 0) file format.
//
// File layout (little-endian): seven int32 `dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
// seq_len` (a negative vocab_size means a separate classifier follows), then float32 tensors, per-layer ones
// stacked over layers: token embedding [vocab, dim]; attention RMSNorm [layers, dim]; wq [layers, heads*hs,
// dim]; wk, wv [layers, kv_heads*hs, dim]; wo [layers, dim, heads*hs]; FFN RMSNorm [layers, dim]; w1 [layers,
// hidden, dim]; w2 [layers, dim, hidden]; w3 [layers, hidden, dim]; final RMSNorm [dim]; two unused RoPE
// tables of seq_len*hs/2 floats each; the classifier [vocab, dim] when not shared.
#pragma once

#include <toptheta/scalar_traits.hpp>

#include <Eigen/Core>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace llama2c {

using toptheta::Index;
/// Row-major matrices: weights `[out, in]` as in the file (`y = W x` is `x^T W^T` on row vectors) and
/// activations `[tokens, features]`.
template <class Real>
using RowMatrix = Eigen::Matrix<Real, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class Real>
using ColumnVector = Eigen::Matrix<Real, Eigen::Dynamic, 1>;
using Matrix = RowMatrix<float>;
using Vector = ColumnVector<float>;

/// A checkpoint that cannot be loaded; what() reads "llama2c: <file>: <problem>".
class checkpoint_error : public std::runtime_error {
 public:
  checkpoint_error(const std::string& file, const std::string& problem)
      : std::runtime_error("llama2c: " + file + ": " + problem), file_(file) {}
  const std::string& file() const { return file_; }

 private:
  std::string file_;
};

/// The shape of a Llama-architecture model, as the checkpoint header gives it.
struct Config {
  Index dim = 0;         ///< model width
  Index hidden_dim = 0;  ///< FFN width
  Index layers = 0;
  Index heads = 0;     ///< query heads
  Index kv_heads = 0;  ///< key/value heads; query head h reads KV head h / (heads / kv_heads)
  Index vocab_size = 0;
  Index seq_len = 0;              ///< context length the model was trained for
  bool shared_classifier = true;  ///< logits use the token embedding matrix

  Index head_dim() const { return dim / heads; }
  Index kv_dim() const { return kv_heads * head_dim(); }

  /// Throws `checkpoint_error` naming `source` and the first field that does not describe a model.
  void validate(const std::string& source) const {
    const auto check = [&](bool ok, const std::string& problem) {
      if (!ok) throw checkpoint_error(source, "header: " + problem);
    };
    // The bound keeps every tensor size below 2^62 bytes, so size arithmetic cannot overflow.
    constexpr Index limit = Index(1) << 24;
    const auto positive = [&](Index value, const char* name) {
      check(value >= 1 && value <= limit,
            std::string(name) + " = " + std::to_string(value) + ", expected 1 ... " + std::to_string(limit));
    };
    positive(dim, "dim");
    positive(hidden_dim, "hidden_dim");
    positive(layers, "n_layers");
    positive(heads, "n_heads");
    positive(kv_heads, "n_kv_heads");
    positive(vocab_size, "|vocab_size|");
    positive(seq_len, "seq_len");
    check(dim % heads == 0,
          "dim = " + std::to_string(dim) + " is not a multiple of n_heads = " + std::to_string(heads));
    check(heads % kv_heads == 0,
          "n_heads = " + std::to_string(heads) + " is not a multiple of n_kv_heads = " + std::to_string(kv_heads));
    check(head_dim() % 2 == 0,
          "head size dim / n_heads = " + std::to_string(head_dim()) + " is odd; RoPE rotates pairs of dimensions");
  }
};

/// The weights of one transformer layer.
template <class Real>
struct LayerWeights {
  ColumnVector<Real> attention_norm;  ///< [dim]
  RowMatrix<Real> wq;                 ///< [heads * hs, dim]
  RowMatrix<Real> wk, wv;             ///< [kv_heads * hs, dim]
  RowMatrix<Real> wo;                 ///< [dim, heads * hs]
  ColumnVector<Real> ffn_norm;        ///< [dim]
  RowMatrix<Real> w1, w3;             ///< [hidden, dim]: gate and up projections
  RowMatrix<Real> w2;                 ///< [dim, hidden]: down projection

  template <class To>
  LayerWeights<To> cast() const {
    return {attention_norm.template cast<To>(),
            wq.template cast<To>(),
            wk.template cast<To>(),
            wv.template cast<To>(),
            wo.template cast<To>(),
            ffn_norm.template cast<To>(),
            w1.template cast<To>(),
            w3.template cast<To>(),
            w2.template cast<To>()};
  }
};

/// Every weight of a model, in `Real`.
template <class Real>
struct ModelWeights {
  RowMatrix<Real> token_embedding;  ///< [vocab, dim]
  std::vector<LayerWeights<Real>> layers;
  ColumnVector<Real> final_norm;  ///< [dim]
  RowMatrix<Real> classifier;     ///< [vocab, dim]; empty when the classifier shares the token embedding

  /// The matrix the logits are computed with: `logits = W_cls x`.
  const RowMatrix<Real>& output_weights() const { return classifier.size() == 0 ? token_embedding : classifier; }

  /// The same weights converted to `To` (an engine computing in double keeps such a copy).
  template <class To>
  ModelWeights<To> cast() const {
    ModelWeights<To> to;
    to.token_embedding = token_embedding.template cast<To>();
    for (const auto& layer : layers) to.layers.push_back(layer.template cast<To>());
    to.final_norm = final_norm.template cast<To>();
    to.classifier = classifier.template cast<To>();
    return to;
  }

  /// Number of weights.
  Index parameters() const {
    Index count = token_embedding.size() + final_norm.size() + classifier.size();
    for (const auto& layer : layers)
      count += layer.attention_norm.size() + layer.wq.size() + layer.wk.size() + layer.wv.size() + layer.wo.size() +
               layer.ffn_norm.size() + layer.w1.size() + layer.w2.size() + layer.w3.size();
    return count;
  }
};

/// A llama2.c model: its shape and its float32 weights (the unused RoPE tables are not kept).
struct Model : ModelWeights<float> {
  Config config;
};

namespace detail {

/// Reads the tensors of one checkpoint in file order, naming the file and tensor in every error.
class CheckpointReader {
 public:
  CheckpointReader(std::ifstream& in, const std::string& path) : in_(in), path_(path) {}

  void read(float* data, Index count, const std::string& tensor) {
    in_.read(reinterpret_cast<char*>(data), std::streamsize(count * Index(sizeof(float))));
    if (!in_) throw checkpoint_error(path_, "read failed in " + tensor);
    for (Index i = 0; i < count; ++i)
      if (!std::isfinite(data[i]))
        throw checkpoint_error(path_, "non-finite value " + std::to_string(data[i]) + " in " + tensor + " at element " +
                                          std::to_string(i));
  }
  Matrix matrix(Index rows, Index cols, const std::string& tensor) {
    Matrix m(rows, cols);
    read(m.data(), m.size(), tensor);
    return m;
  }
  Vector vector(Index size, const std::string& tensor) {
    Vector v(size);
    read(v.data(), v.size(), tensor);
    return v;
  }
  void skip(Index floats) { in_.seekg(std::streamoff(floats * Index(sizeof(float))), std::ios::cur); }

 private:
  std::ifstream& in_;
  const std::string& path_;
};

/// Floats after the header that a checkpoint of shape `config` holds, RoPE tables and classifier included.
inline Index checkpoint_floats(const Config& c) {
  const Index hs = c.head_dim();
  const Index per_layer =
      2 * c.dim + c.dim * c.heads * hs + 2 * c.dim * c.kv_dim() + c.heads * hs * c.dim + 3 * c.dim * c.hidden_dim;
  return c.vocab_size * c.dim + c.layers * per_layer + c.dim + c.seq_len * hs +
         (c.shared_classifier ? 0 : c.vocab_size * c.dim);
}

}  // namespace detail

/// Loads a legacy llama2.c float32 checkpoint.
///
/// Throws `checkpoint_error` naming `path` when the file is missing or unreadable, is a newer llama2.c export
/// (magic "ak42"), has a header that describes no model, is shorter or longer than its header requires, or
/// holds a non-finite weight. Cost: one sequential read of the file; memory: the weights once.
inline Model load_model(const std::string& path) {
  {
    const std::uint32_t one = 1;
    unsigned char first_byte = 0;
    std::memcpy(&first_byte, &one, 1);
    if (first_byte != 1) throw checkpoint_error(path, "this loader needs a little-endian host");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) throw checkpoint_error(path, "cannot open the file (missing or unreadable)");
  in.seekg(0, std::ios::end);
  const Index file_bytes = Index(in.tellg());
  in.seekg(0, std::ios::beg);

  constexpr Index header_bytes = 7 * sizeof(std::int32_t);
  if (file_bytes < header_bytes)
    throw checkpoint_error(path, "truncated: " + std::to_string(file_bytes) + " bytes, the header alone needs " +
                                     std::to_string(header_bytes));
  std::int32_t header[7];
  in.read(reinterpret_cast<char*>(header), header_bytes);
  if (!in) throw checkpoint_error(path, "cannot read the header");
  if (std::uint32_t(header[0]) == 0x616b3432u)
    throw checkpoint_error(path, "a newer llama2.c export (magic \"ak42\", version " + std::to_string(header[1]) +
                                     "); only the legacy float32 format is supported");

  Model model;
  Config& c = model.config;
  c.dim = header[0];
  c.hidden_dim = header[1];
  c.layers = header[2];
  c.heads = header[3];
  c.kv_heads = header[4];
  c.shared_classifier = header[5] > 0;
  c.vocab_size = header[5] < 0 ? -Index(header[5]) : Index(header[5]);
  c.seq_len = header[6];
  c.validate(path);

  const Index expected_bytes = header_bytes + Index(sizeof(float)) * detail::checkpoint_floats(c);
  if (file_bytes != expected_bytes)
    throw checkpoint_error(path, std::string(file_bytes < expected_bytes ? "truncated" : "too long") + ": " +
                                     std::to_string(file_bytes) + " bytes, but the header (dim " +
                                     std::to_string(c.dim) + ", hidden_dim " + std::to_string(c.hidden_dim) +
                                     ", n_layers " + std::to_string(c.layers) + ", n_heads " + std::to_string(c.heads) +
                                     ", n_kv_heads " + std::to_string(c.kv_heads) + ", vocab_size " +
                                     std::to_string(header[5]) + ", seq_len " + std::to_string(c.seq_len) +
                                     ") describes " + std::to_string(expected_bytes));

  detail::CheckpointReader reader(in, path);
  using Layer = LayerWeights<float>;
  const Index hs = c.head_dim(), q_dim = c.heads * hs;
  model.token_embedding = reader.matrix(c.vocab_size, c.dim, "token_embedding");
  model.layers.resize(std::size_t(c.layers));
  // Each tensor is stacked over layers in the file, so the layers are filled one tensor kind at a time.
  const auto each_layer = [&](const char* name, auto&& read_one) {
    for (Index l = 0; l < c.layers; ++l)
      read_one(model.layers[std::size_t(l)], std::string(name) + "[layer " + std::to_string(l) + "]");
  };
  each_layer("rms_att_weight", [&](Layer& w, const std::string& n) { w.attention_norm = reader.vector(c.dim, n); });
  each_layer("wq", [&](Layer& w, const std::string& n) { w.wq = reader.matrix(q_dim, c.dim, n); });
  each_layer("wk", [&](Layer& w, const std::string& n) { w.wk = reader.matrix(c.kv_dim(), c.dim, n); });
  each_layer("wv", [&](Layer& w, const std::string& n) { w.wv = reader.matrix(c.kv_dim(), c.dim, n); });
  each_layer("wo", [&](Layer& w, const std::string& n) { w.wo = reader.matrix(c.dim, q_dim, n); });
  each_layer("rms_ffn_weight", [&](Layer& w, const std::string& n) { w.ffn_norm = reader.vector(c.dim, n); });
  each_layer("w1", [&](Layer& w, const std::string& n) { w.w1 = reader.matrix(c.hidden_dim, c.dim, n); });
  each_layer("w2", [&](Layer& w, const std::string& n) { w.w2 = reader.matrix(c.dim, c.hidden_dim, n); });
  each_layer("w3", [&](Layer& w, const std::string& n) { w.w3 = reader.matrix(c.hidden_dim, c.dim, n); });
  model.final_norm = reader.vector(c.dim, "rms_final_weight");
  reader.skip(c.seq_len * hs);  // freq_cis_real and freq_cis_imag, seq_len * hs / 2 each: RoPE is recomputed
  if (!c.shared_classifier) model.classifier = reader.matrix(c.vocab_size, c.dim, "wcls");
  return model;
}

}  // namespace llama2c
