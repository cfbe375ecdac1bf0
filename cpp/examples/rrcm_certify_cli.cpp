// rrcm-certify-cpp: certify PGM/PPM images with an `rrcm export aoti` package, or print the
// Clopper-Pearson bound and radius for given counts (`--bound`).
#include <chrono>
#include <cstdio>
#include <iostream>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "rrcm/certify.h"

namespace {

const char* kUsage =
    "usage: rrcm-certify-cpp --model F.pt2 [options] IMAGE.pgm|IMAGE.ppm...\n"
    "       rrcm-certify-cpp --bound K N ALPHA SIGMA\n"
    "       rrcm-certify-cpp --bound -      (lines 'K N ALPHA SIGMA' on stdin)\n"
    "\n"
    "Certify 8-bit binary PGM (P5) / PPM (P6) images with Cohen et al.'s CERTIFY; one TSV row per image:\n"
    "image, predict (-1: abstain), radius, pA_lower, count, n, time (s).\n"
    "  --model F.pt2     package written by 'rrcm export aoti'\n"
    "  --sigma S         noise level to certify at: required for a package with a sigma input (exported from a\n"
    "                    classifier fine-tuned for several sigmas), one it serves; a package for one sigma uses\n"
    "                    its own, which S must equal\n"
    "  --n0 N0           selection samples (default 100)\n"
    "  --n N             estimation samples (default 100000)\n"
    "  --alpha A         failure probability of the certificate (default 0.001)\n"
    "  --batch B         noisy copies per forward pass (default 1000; a static-batch package uses its own)\n"
    "  --seed S          seed of the noise generator (default 0)\n"
    "  --device-index I  GPU for a CUDA package (default: the current one)\n"
    "  --bound K N ALPHA SIGMA  print the lower bound on pA from K of N and the radius SIGMA * PhiInv(bound)\n"
    "                    (radius 'nan' when the bound is below 1/2: abstain), 17 significant digits\n";

int64_t parse_int(const std::string& name, const std::string& s) {
  try {
    size_t used = 0;
    long long v = std::stoll(s, &used);
    if (used == s.size()) return v;
  } catch (const std::exception&) {
  }
  throw rrcm::UserError(name + ": not an integer: '" + s + "'");
}

double parse_double(const std::string& name, const std::string& s) {
  try {
    size_t used = 0;
    double v = std::stod(s, &used);
    if (used == s.size()) return v;
  } catch (const std::exception&) {
  }
  throw rrcm::UserError(name + ": not a number: '" + s + "'");
}

void print_bound(int64_t k, int64_t n, double alpha, double sigma) {
  const double p = rrcm::clopper_pearson_lower(k, n, alpha);
  const double radius = p >= 0.5 ? rrcm::certified_radius(p, sigma) : std::numeric_limits<double>::quiet_NaN();
  std::printf("%.17g\t%.17g\n", p, radius);
}

int bound_mode(const std::vector<std::string>& args) {
  if (args.size() == 1 && args[0] == "-") {
    std::string k, n, alpha, sigma;
    while (std::cin >> k >> n >> alpha >> sigma) {
      print_bound(parse_int("K", k), parse_int("N", n), parse_double("ALPHA", alpha), parse_double("SIGMA", sigma));
    }
    return 0;
  }
  if (args.size() != 4) throw rrcm::UserError("--bound takes K N ALPHA SIGMA, or '-' to read them from stdin");
  print_bound(parse_int("K", args[0]), parse_int("N", args[1]), parse_double("ALPHA", args[2]),
              parse_double("SIGMA", args[3]));
  return 0;
}

int run(int argc, char** argv) {
  std::string model;
  int64_t n0 = 100, n = 100000, batch = 1000, seed = 0, device_index = -1;
  double alpha = 0.001;
  std::optional<double> sigma;
  std::vector<std::string> images;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (arg == "--bound") return bound_mode(std::vector<std::string>(argv + i + 1, argv + argc));
    if (arg.rfind("--", 0) == 0) {
      if (i + 1 >= argc) throw rrcm::UserError(arg + " needs a value");
      const std::string value = argv[++i];
      if (arg == "--model") model = value;
      else if (arg == "--n0") n0 = parse_int(arg, value);
      else if (arg == "--n") n = parse_int(arg, value);
      else if (arg == "--alpha") alpha = parse_double(arg, value);
      else if (arg == "--sigma") sigma = parse_double(arg, value);
      else if (arg == "--batch") batch = parse_int(arg, value);
      else if (arg == "--seed") seed = parse_int(arg, value);
      else if (arg == "--device-index") device_index = parse_int(arg, value);
      else throw rrcm::UserError("unknown option " + arg);
    } else {
      images.push_back(arg);
    }
  }
  if (model.empty() || images.empty()) throw rrcm::UserError("need --model F.pt2 and at least one image (see --help)");

  rrcm::check_parameters(n0, n, alpha, batch);
  rrcm::Certifier certifier(model, static_cast<int>(device_index), sigma);
  std::vector<at::Tensor> pixels;  // all read and checked before any output
  for (const auto& path : images) {
    pixels.push_back(rrcm::read_pnm(path));
    try {
      certifier.check_image(pixels.back());
    } catch (const rrcm::UserError& e) {
      throw rrcm::UserError(path + ": " + e.what());
    }
  }
  const rrcm::ModelInfo& info = certifier.info();
  const std::string input = info.sigma_input ? " (sigma input: " + rrcm::describe_sigmas(info) + ")" : "";
  std::fprintf(stderr, "model: %s, sigma %g%s, %lld classes, input %lldx%lldx%lld, dataset %s, device %s\n",
               model.c_str(), info.sigma, input.c_str(), static_cast<long long>(info.num_classes),
               static_cast<long long>(info.channels), static_cast<long long>(info.height),
               static_cast<long long>(info.width), info.dataset.c_str(), info.device.c_str());
  std::printf("image\tpredict\tradius\tpA_lower\tcount\tn\ttime\n");
  for (size_t i = 0; i < images.size(); ++i) {
    const auto start = std::chrono::steady_clock::now();
    const rrcm::Certificate c = certifier.certify(pixels[i], n0, n, alpha, batch, static_cast<uint64_t>(seed));
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("%s\t%lld\t%.9g\t%.9g\t%lld\t%lld\t%.3f\n", images[i].c_str(), static_cast<long long>(c.prediction),
                c.radius, c.p_lower, static_cast<long long>(c.count), static_cast<long long>(c.n), seconds);
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const rrcm::UserError& e) {
    std::fprintf(stderr, "rrcm-certify-cpp: error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rrcm-certify-cpp: internal error: %s\n", rrcm::first_line(e.what()).c_str());
    return 1;
  }
}
