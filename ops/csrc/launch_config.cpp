// Prints, for every kernel cost_volume_kernels.cu launches, its threads per block and dynamic shared memory, from
// the same constants the launches use (built with g++ -DHCML_EMULATE, no GPU or CUDA needed). ops/static.py reads
// it so that the static report's resident blocks per SM count the shared memory the kernels really take.
#include <cstdio>

#include "cost_volume_nhwc.cuh"

using namespace hcml::nhwc;

template <typename T>
void fast(const char* name) {
  using K = Fast<T, 7, 2>;
  std::printf("forward_fast<%s, 7, 2> %d %d\n", name, K::THREADS, K::SMEM_FWD);
  std::printf("backward_fast<%s, 7, 2> %d %d\n", name, K::THREADS_BWD, K::SMEM_BWD);
  if constexpr (sizeof(T) == 2) {
    using C = Tc<T, 7, 2>;
    std::printf("forward_tc<%s, 7, 2> %d %d\n", name, C::THREADS, C::SMEM_FWD);
    std::printf("backward_tc<%s, 7, 2> %d %d\n", name, C::THREADS, C::SMEM_BWD);
  }
  std::printf("forward_generic<%s> %d 0\n", name, GENERIC_THREADS);
  std::printf("backward_generic<%s> %d 0\n", name, GENERIC_THREADS);
}

int main() {
  fast<float>("float");
  fast<__half>("__half");
  fast<__nv_bfloat16>("__nv_bfloat16");
  return 0;
}
