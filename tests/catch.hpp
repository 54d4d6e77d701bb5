// Includes Catch2 whichever major version was found: tests write `#include "catch.hpp"`. Also the one way a
// test that cannot run says so, `TOPTHETA_SKIP(message)`.
#pragma once
#ifdef TOPTHETA_CATCH2_V3
#include <catch2/catch_all.hpp>
#else
#include <catch2/catch.hpp>
#endif

#include <cstdio>
#include <cstdlib>
#include <string>

/// Exit code of a test process that skipped, when CTest runs one test case per process (tests/CMakeLists.txt
/// sets `TOPTHETA_TEST_SKIP_CODE` and the same `SKIP_RETURN_CODE`); 0 when the variable is unset.
inline int toptheta_test_skip_code() {
  const char* code = std::getenv("TOPTHETA_TEST_SKIP_CODE");
  return code ? std::atoi(code) : 0;
}

/// Skips the running test with `message` (a `std::string`). Catch2 3.3+ has SKIP. Under older versions a test
/// that warns and returns would count as passed, so when CTest runs the test alone the process exits with the
/// code CTest reports as skipped (the message on stderr); run by hand it warns and returns.
#if defined(TOPTHETA_CATCH2_V3) && defined(SKIP)
#define TOPTHETA_SKIP(message) SKIP(message)
#else
#define TOPTHETA_SKIP(message)                                              \
  do {                                                                      \
    const std::string toptheta_skip_message = (message);                    \
    if (const int code = toptheta_test_skip_code(); code != 0) {            \
      std::fprintf(stderr, "SKIPPED: %s\n", toptheta_skip_message.c_str()); \
      std::fflush(nullptr);                                                 \
      std::_Exit(code);                                                     \
    }                                                                       \
    WARN(toptheta_skip_message);                                            \
    return;                                                                 \
  } while (false)
#endif
