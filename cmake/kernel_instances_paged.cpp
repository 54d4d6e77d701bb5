// Definitions of one group of the shared kernel instantiations declared in kernel_instances.hpp.
#include "kernel_instances.hpp"

TOPTHETA_KERNEL_INSTANCES_PAGED()
