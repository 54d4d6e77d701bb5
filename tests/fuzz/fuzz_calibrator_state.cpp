// libFuzzer target: a calibrator's state decoder on arbitrary bytes. The first byte chooses the receiving
// calibrator's options (probability space with masses, or raw scores without); the rest is merged into a fresh
// calibrator. An accepted state must encode back to the same bytes and build a table. The only exception
// allowed out is toptheta::invalid_argument.
#include <toptheta/calibrator.hpp>
#include <toptheta/calibrator_state.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  using namespace toptheta;
  CalibratorOptions options;
  options.shape = {2, 2, 1, 16};
  options.k = {4, 6};
  const bool probability = (data[0] & 1) == 0;
  options.space = probability ? ThresholdSpace::probability : ThresholdSpace::raw_score;
  options.summary_masses = probability;
  Calibrator calibrator(options);
  try {
    merge_calibrator_state(calibrator, data + 1, size - 1);
  } catch (const invalid_argument&) {
    return 0;
  }
  if (encode_calibrator_state(calibrator) != std::vector<std::uint8_t>(data + 1, data + size)) std::abort();
  for (CalibrationMethod method :
       {CalibrationMethod::mean_of_thresholds,
        probability ? CalibrationMethod::budget_matched : CalibrationMethod::count_matched}) {
    TableOptions table_options;
    table_options.method = method;
    table_options.missing = MissingCalibration::keep_all;
    try {
      (void)calibrator.table(table_options);
    } catch (const invalid_argument&) {
    }
  }
  return 0;
}
