// Placeholder: replaced by the README usage example.
#include <toptheta/toptheta.hpp>
int main() { return 0; }
