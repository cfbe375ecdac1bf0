// rrcm_certify: randomized-smoothing certification (Cohen et al.'s CERTIFY) of an rRCM classifier
// exported with `rrcm export aoti`, embedded in a C++ program through libtorch's AOTInductor loader.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include <ATen/Tensor.h>
#include <ATen/core/Generator.h>

namespace torch::inductor {
class AOTIModelPackageLoader;
}

namespace rrcm {

// Bad input (missing/corrupt package or image, wrong shapes, impossible parameters).
class UserError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// What `rrcm export aoti` records in the package's metadata (keys "rrcm.*").
struct ModelInfo {
  double sigma = 0;            // noise std in pixel space [0, 1]
  int64_t num_classes = 0;
  int64_t channels = 0, height = 0, width = 0;
  double input_scale = 1;      // the package's input is u = input_scale * x_noisy + input_shift
  double input_shift = 0;
  int64_t batch = 0;           // 0: any batch size; otherwise the only one the package accepts
  std::string dataset, device, version;
};

ModelInfo parse_metadata(const std::unordered_map<std::string, std::string>& metadata);

// One-sided (1 - alpha) Clopper-Pearson lower confidence bound on p from k successes in n trials.
double clopper_pearson_lower(int64_t k, int64_t n, double alpha);

// sigma * PhiInv(p_lower): the certified L2 radius (meaningful for p_lower > 1/2).
double certified_radius(double p_lower, double sigma);

struct Certificate {
  int64_t prediction = -1;  // -1: abstain
  double radius = 0;        // 0 when abstaining
  double p_lower = 0;
  int64_t count = 0;        // estimation samples voting for the selected class
  int64_t n = 0;
};

// Throws UserError unless n0, n, batch >= 1 and 0 < alpha < 1.
void check_parameters(int64_t n0, int64_t n, double alpha, int64_t batch);

// The decision of CERTIFY from the selected class and its estimation count.
Certificate decide(int64_t selected, int64_t count, int64_t n, double alpha, double sigma);

// An 8-bit binary PGM (P5, 1 channel) or PPM (P6, 3 channels) as float (C, H, W) in [0, 1].
at::Tensor read_pnm(const std::string& path);

class Certifier {
 public:
  // `device_index` picks the GPU for a CUDA package (-1: the current one).
  explicit Certifier(const std::string& package_path, int device_index = -1);
  ~Certifier();

  const ModelInfo& info() const { return info_; }

  // Throws UserError unless `image` is (C, H, W) of the package's input shape, finite, in [0, 1].
  void check_image(const at::Tensor& image) const;

  // (num_classes,) int64 counts of the top class over `num` noisy copies of `image` (C, H, W).
  at::Tensor sample_counts(const at::Tensor& image, int64_t num, int64_t batch, at::Generator& gen);

  // CERTIFY: n0 selection samples pick the class, n estimation samples bound its probability.
  Certificate certify(const at::Tensor& image, int64_t n0, int64_t n, double alpha, int64_t batch,
                      uint64_t seed);

 private:
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader_;
  ModelInfo info_;
  at::Device device_;
};

}  // namespace rrcm
