// rf::cuda::error_string: the name of the cudaError_t that a launcher returned as int.
#include <cuda_runtime.h>

#include "resnet_fused/kernels.h"

namespace rf {
namespace cuda {

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace cuda
}  // namespace rf
