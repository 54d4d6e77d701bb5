// The `llama2c` program's command line: calibrate, eval, generate, tokenize and table (commands.cpp, compiled
// once into the toptheta_llama2c_tools library for the program and its tests).
#pragma once

#include <ostream>
#include <string>
#include <vector>

namespace llama2c {

/// Runs the program on `arguments` (the first is the command name): prints to `out`, errors to `error`.
/// Returns the exit status: 0, 2 for a command line that cannot be run (`usage_error`), 1 for any other error.
int run_command_line(const std::vector<std::string>& arguments, std::ostream& out, std::ostream& error);

}  // namespace llama2c
