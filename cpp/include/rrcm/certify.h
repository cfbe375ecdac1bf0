// rrcm_certify: randomized-smoothing certification (Cohen et al.'s CERTIFY) of an rRCM classifier
// exported with `rrcm export aoti`, embedded in a C++ program through libtorch's AOTInductor loader.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include <ATen/Tensor.h>
#include <ATen/core/Generator.h>

#include "rrcm/errors.h"
#include "rrcm/package.h"

namespace rrcm {

// What `rrcm export aoti` records in the package's metadata (keys "rrcm.*").
// A package for one sigma records it; a package with a sigma input (a classifier fine-tuned for several)
// records the sigmas it serves instead, a list or a range, and takes pixel-space input (scale 1, shift 0).
struct ModelInfo {
  double sigma = 0;            // noise std in pixel space [0, 1]; for a sigma-input package the one chosen
  bool sigma_input = false;    // the package's second input is sigma, float (1,)
  std::vector<double> sigmas;  // a sigma-input package: the listed sigmas it serves, or
  double sigma_lo = 0, sigma_hi = 0;  // the range [sigma_lo, sigma_hi] it serves (sigmas empty)
  int64_t num_classes = 0;
  int64_t channels = 0, height = 0, width = 0;
  double input_scale = 1;      // the package's input is u = input_scale * x_noisy + input_shift
  double input_shift = 0;
  int64_t batch = 0;           // 0: any batch size; otherwise the only one the package accepts
  std::string dataset, device, version;
};

ModelInfo parse_metadata(const std::unordered_map<std::string, std::string>& metadata);

// "sigma 0.25", "sigma 0.25, 0.5 and 1" or "sigma in [0.12, 1]": what a package serves.
std::string describe_sigmas(const ModelInfo& info);

// The sigma to certify at: for a sigma-input package `sigma`, required and one it serves; for a package
// of one sigma its own, which a given `sigma` must equal. Throws UserError otherwise.
double choose_sigma(const ModelInfo& info, std::optional<double> sigma);

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
  // The package loaded by load_package (checked first); `device_index` picks the GPU for a CUDA package (-1: the
  // current one); `sigma` as in choose_sigma.
  explicit Certifier(const std::string& package_path, int device_index = -1, std::optional<double> sigma = std::nullopt);
  ~Certifier();

  const ModelInfo& info() const { return info_; }

  // Throws UserError unless `image` is (C, H, W) of the package's input shape, finite, in [0, 1].
  void check_image(const at::Tensor& image) const;

  // (num_classes,) int64 counts of the top class over `num` noisy copies of `image` (C, H, W). Throws UserError
  // when the model answers NaN or Inf for any of them: its argmax means nothing.
  at::Tensor sample_counts(const at::Tensor& image, int64_t num, int64_t batch, at::Generator& gen);

  // CERTIFY: n0 selection samples pick the class, n estimation samples bound its probability.
  Certificate certify(const at::Tensor& image, int64_t n0, int64_t n, double alpha, int64_t batch,
                      uint64_t seed);

 private:
  Package loader_;
  ModelInfo info_;
  at::Device device_;
  at::Tensor sigma_input_;  // (1,) on device_, for a sigma-input package
};

}  // namespace rrcm
