#include "rrcm/certify.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <boost/math/distributions/normal.hpp>
#include <boost/math/special_functions/beta.hpp>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

namespace rrcm {
namespace {

const std::string& require(const std::unordered_map<std::string, std::string>& m, const std::string& key) {
  auto it = m.find(key);
  if (it == m.end()) {
    throw UserError("not an rrcm package: no '" + key + "' in its metadata (export it with 'rrcm export aoti')");
  }
  return it->second;
}

double to_double(const std::string& key, const std::string& value) {
  try {
    size_t used = 0;
    double v = std::stod(value, &used);
    if (used == value.size()) return v;
  } catch (const std::exception&) {
  }
  throw UserError("package metadata '" + key + "' is not a number: " + value);
}

int64_t to_int(const std::string& key, const std::string& value) {
  try {
    size_t used = 0;
    long long v = std::stoll(value, &used);
    if (used == value.size()) return v;
  } catch (const std::exception&) {
  }
  throw UserError("package metadata '" + key + "' is not an integer: " + value);
}

std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (start <= s.size()) {
    size_t end = std::min(s.find(',', start), s.size());
    parts.push_back(s.substr(start, end - start));
    start = end + 1;
  }
  return parts;
}

std::string format_g(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

// Python's math.isclose(a, b, rel_tol=1e-9), which rrcm uses for sigmas.
bool is_close(double a, double b) { return std::abs(a - b) <= 1e-9 * std::max(std::abs(a), std::abs(b)); }

bool positive(double v) { return std::isfinite(v) && v > 0; }

}  // namespace

ModelInfo parse_metadata(const std::unordered_map<std::string, std::string>& m) {
  ModelInfo info;
  if (m.count("rrcm.sigmas") || m.count("rrcm.sigma_range")) {
    info.sigma_input = true;
    const std::string key = m.count("rrcm.sigmas") ? "rrcm.sigmas" : "rrcm.sigma_range";
    std::vector<double> values;
    for (const auto& part : split_commas(m.at(key))) values.push_back(to_double(key, part));
    if (!std::all_of(values.begin(), values.end(), positive)) throw UserError("package metadata holds impossible sigmas");
    if (key == "rrcm.sigmas") {
      info.sigmas = values;
    } else if (values.size() == 2 && values[0] < values[1]) {
      info.sigma_lo = values[0];
      info.sigma_hi = values[1];
    } else {
      throw UserError("package metadata 'rrcm.sigma_range' is not LO,HI with LO < HI: " + m.at(key));
    }
  } else {
    info.sigma = to_double("rrcm.sigma", require(m, "rrcm.sigma"));
    if (!positive(info.sigma)) throw UserError("package metadata holds impossible values");
  }
  info.num_classes = to_int("rrcm.num_classes", require(m, "rrcm.num_classes"));
  info.input_scale = to_double("rrcm.input_scale", require(m, "rrcm.input_scale"));
  info.input_shift = to_double("rrcm.input_shift", require(m, "rrcm.input_shift"));
  info.batch = to_int("rrcm.batch", require(m, "rrcm.batch"));
  info.dataset = require(m, "rrcm.dataset");
  info.device = require(m, "rrcm.device");
  info.version = require(m, "rrcm.version");
  const std::string& shape = require(m, "rrcm.input_shape");  // "C,H,W"
  std::vector<int64_t> dims;
  for (const auto& part : split_commas(shape)) dims.push_back(to_int("rrcm.input_shape", part));
  if (dims.size() != 3) throw UserError("package metadata 'rrcm.input_shape' is not C,H,W: " + shape);
  info.channels = dims[0];
  info.height = dims[1];
  info.width = dims[2];
  if (info.num_classes < 1 || info.channels < 1 || info.batch < 0) {
    throw UserError("package metadata holds impossible values");
  }
  if (info.device != "cpu" && info.device != "cuda") {
    throw UserError("package compiled for unsupported device '" + info.device + "'");
  }
  return info;
}

std::string describe_sigmas(const ModelInfo& info) {
  if (!info.sigma_input) return "sigma " + format_g(info.sigma);
  if (info.sigmas.empty()) return "sigma in [" + format_g(info.sigma_lo) + ", " + format_g(info.sigma_hi) + "]";
  std::string text = "sigma ";
  for (size_t i = 0; i < info.sigmas.size(); ++i) {
    text += (i == 0 ? "" : i + 1 == info.sigmas.size() ? " and " : ", ") + format_g(info.sigmas[i]);
  }
  return text;
}

double choose_sigma(const ModelInfo& info, std::optional<double> sigma) {
  if (sigma && !positive(*sigma)) throw UserError("sigma must be a positive number, got " + format_g(*sigma));
  if (!info.sigma_input) {
    if (sigma && !is_close(*sigma, info.sigma)) {
      throw UserError("the package was built for sigma " + format_g(info.sigma) + ", not " + format_g(*sigma));
    }
    return info.sigma;
  }
  if (!sigma) {
    throw UserError("the package takes the noise level as an input and serves " + describe_sigmas(info) +
                    ": give the sigma to certify at (--sigma)");
  }
  const double s = *sigma;
  const bool served = info.sigmas.empty()
                          ? (s >= info.sigma_lo && s <= info.sigma_hi) || is_close(s, info.sigma_lo) || is_close(s, info.sigma_hi)
                          : std::any_of(info.sigmas.begin(), info.sigmas.end(), [s](double v) { return is_close(s, v); });
  if (!served) throw UserError("the package serves " + describe_sigmas(info) + ", not " + format_g(s));
  return s;
}

double clopper_pearson_lower(int64_t k, int64_t n, double alpha) {
  if (n < 1 || k < 0 || k > n) {
    throw UserError("need 0 <= k <= n and n >= 1, got k=" + std::to_string(k) + " n=" + std::to_string(n));
  }
  if (!(alpha > 0 && alpha < 1)) throw UserError("alpha must lie in (0, 1), got " + std::to_string(alpha));
  if (k == 0) return 0.0;
  // The alpha quantile of Beta(k, n - k + 1).
  return boost::math::ibeta_inv(static_cast<double>(k), static_cast<double>(n - k + 1), alpha);
}

double certified_radius(double p_lower, double sigma) {
  if (!(p_lower > 0 && p_lower < 1)) throw UserError("p_lower must lie in (0, 1), got " + std::to_string(p_lower));
  return sigma * boost::math::quantile(boost::math::normal(), p_lower);
}

void check_parameters(int64_t n0, int64_t n, double alpha, int64_t batch) {
  if (n0 < 1 || n < 1 || batch < 1) throw UserError("n0, n and batch must be positive");
  if (!(alpha > 0 && alpha < 1)) throw UserError("alpha must lie in (0, 1), got " + std::to_string(alpha));
}

Certificate decide(int64_t selected, int64_t count, int64_t n, double alpha, double sigma) {
  Certificate c;
  c.count = count;
  c.n = n;
  c.p_lower = clopper_pearson_lower(count, n, alpha);
  if (c.p_lower >= 0.5) {
    c.prediction = selected;
    c.radius = certified_radius(c.p_lower, sigma);
  }
  return c;
}

at::Tensor read_pnm(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UserError(path + ": cannot open image");
  char magic[2] = {0, 0};
  in.read(magic, 2);
  if (magic[0] != 'P' || (magic[1] != '5' && magic[1] != '6')) {
    throw UserError(path + ": not a binary PGM (P5) or PPM (P6) image");
  }
  const int64_t channels = magic[1] == '5' ? 1 : 3;
  auto header_int = [&]() -> int64_t {
    int ch = in.get();
    while (ch != EOF && (std::isspace(ch) || ch == '#')) {
      if (ch == '#') {
        while (ch != EOF && ch != '\n') ch = in.get();
      }
      ch = in.get();
    }
    if (ch == EOF || !std::isdigit(ch)) throw UserError(path + ": corrupt PGM/PPM header");
    int64_t v = 0;
    while (ch != EOF && std::isdigit(ch)) {
      v = v * 10 + (ch - '0');
      if (v > (int64_t{1} << 24)) throw UserError(path + ": PGM/PPM header value too large");
      ch = in.get();
    }
    if (ch == EOF || !std::isspace(ch)) throw UserError(path + ": corrupt PGM/PPM header");
    return v;  // the single whitespace after the value is consumed
  };
  const int64_t width = header_int(), height = header_int(), maxval = header_int();
  if (width < 1 || height < 1) throw UserError(path + ": empty image");
  if (maxval < 1 || maxval > 255) throw UserError(path + ": only 8-bit PGM/PPM images (maxval <= 255) are supported");
  std::vector<uint8_t> pixels(static_cast<size_t>(width * height * channels));
  in.read(reinterpret_cast<char*>(pixels.data()), static_cast<std::streamsize>(pixels.size()));
  if (in.gcount() != static_cast<std::streamsize>(pixels.size())) throw UserError(path + ": truncated image data");
  auto hwc = at::from_blob(pixels.data(), {height, width, channels}, at::kByte);
  return hwc.permute({2, 0, 1}).to(at::kFloat).div_(static_cast<double>(maxval)).contiguous();
}

Certifier::Certifier(const std::string& package_path, int device_index, std::optional<double> sigma) : device_(at::kCPU) {
  if (!std::filesystem::is_regular_file(package_path)) throw UserError(package_path + ": no such package file");
  loader_ = load_package(package_path, device_index);
  info_ = parse_metadata(loader_->get_metadata());
  info_.sigma = choose_sigma(info_, sigma);
  if (info_.device == "cuda") {
    device_ = device_index < 0 ? at::Device(at::kCUDA) : at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device_index));
  }
  if (info_.sigma_input) {
    sigma_input_ = at::full({1}, info_.sigma, at::TensorOptions().device(device_).dtype(at::kFloat));
  }
}

Certifier::~Certifier() = default;

at::Tensor Certifier::sample_counts(const at::Tensor& image, int64_t num, int64_t batch, at::Generator& gen) {
  check_image(image);
  c10::InferenceMode guard;
  const auto options = at::TensorOptions().device(device_).dtype(at::kFloat);
  const auto x = image.to(options).unsqueeze(0);
  auto counts = at::zeros({info_.num_classes}, options.dtype(at::kLong));
  auto finite = at::ones({1}, options.dtype(at::kLong));  // cleared by a NaN or Inf logit, read with the counts
  if (info_.batch > 0) batch = info_.batch;
  for (int64_t done = 0; done < num;) {
    const int64_t b = std::min(batch, num - done);
    // A static-batch package always runs info_.batch rows; the rows past b are dropped unread.
    const int64_t rows = info_.batch > 0 ? info_.batch : b;
    // In place on the fresh noise, so u keeps randn's row-major strides: the compiled package reads
    // its input with the strides it was exported with, and an out-of-place op on a one-channel image
    // may return channels-last strides that still count as contiguous.
    auto u = at::randn({rows, info_.channels, info_.height, info_.width}, gen, options);
    u.mul_(info_.sigma).add_(x).mul_(info_.input_scale).add_(info_.input_shift);
    auto logits = info_.sigma_input ? loader_->run({u, sigma_input_})[0] : loader_->run({u})[0];
    const auto real = logits.slice(0, 0, b);
    finite.mul_(real.isfinite().all());
    counts += at::bincount(real.argmax(1), {}, info_.num_classes);
    done += b;
  }
  const auto host = at::cat({counts, finite}).cpu();  // one synchronization
  if (host[info_.num_classes].item<int64_t>() == 0) {
    throw UserError("the model gave NaN or Inf logits on noisy inputs; it cannot be certified");
  }
  return host.slice(0, 0, info_.num_classes);
}

void Certifier::check_image(const at::Tensor& image) const {
  const std::vector<int64_t> want = {info_.channels, info_.height, info_.width};
  if (image.sizes().vec() != want) {
    throw UserError("image of shape " + c10::str(image.sizes()) + " does not fit the package's input shape " +
                    c10::str(at::IntArrayRef(want)));
  }
  const auto pixels = image.to(at::kDouble);
  if (!pixels.isfinite().all().item<bool>() || pixels.min().item<double>() < 0 || pixels.max().item<double>() > 1) {
    throw UserError("image values must be finite and in [0, 1] (pixel space)");
  }
}

Certificate Certifier::certify(const at::Tensor& image, int64_t n0, int64_t n, double alpha, int64_t batch,
                               uint64_t seed) {
  check_parameters(n0, n, alpha, batch);
  at::Generator gen = at::globalContext().defaultGenerator(device_).clone();
  gen.set_current_seed(seed);
  const int64_t selected = sample_counts(image, n0, batch, gen).argmax().item<int64_t>();
  const int64_t count = sample_counts(image, n, batch, gen)[selected].item<int64_t>();
  return decide(selected, count, n, alpha, info_.sigma);
}

}  // namespace rrcm
