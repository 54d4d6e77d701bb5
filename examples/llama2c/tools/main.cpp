// The llama2c program: calibrate, eval, generate and table on a llama2.c checkpoint (see commands.hpp, or run
// `llama2c --help`).
#include "llama2c/tools/commands.hpp"

#include <Eigen/Core>

#include <iostream>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  // The model's matrices are small: Eigen's own threads would only add overhead (the table parallelises over
  // configurations instead).
  Eigen::setNbThreads(1);
  return llama2c::run_command_line(std::vector<std::string>(argv + 1, argv + argc), std::cout, std::cerr);
}
