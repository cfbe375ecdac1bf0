// The one exception type that the example CLI turns into a one-line error and exit code 2.
#pragma once

#include <stdexcept>
#include <string>

namespace rrcm {

// Bad input (missing/corrupt/unsafe package or image, wrong shapes, impossible parameters, a NaN model).
class UserError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The first line of an error message, for one-line errors.
inline std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

}  // namespace rrcm
