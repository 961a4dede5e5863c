// `parallel(n, grain, f)` runs f(begin, end) over [0, n) on libtorch's own threads, for the C++
// kernels of this crate: a TensorIterator over one byte an item splits the range among them
// (at::parallel_for is a header template that would need these files built with OpenMP).
// `grain`: the fewest items a task.
#pragma once

#include <ATen/ATen.h>
#include <ATen/TensorIterator.h>

#include <algorithm>
#include <cstdint>

namespace d2l {

template <typename F>
void parallel(int64_t n, int64_t grain, const F& f) {
  auto marks = at::empty({n}, at::TensorOptions().dtype(at::kByte));
  auto iter = at::TensorIteratorConfig()
                  .add_output(marks)
                  .resize_outputs(false)
                  .check_all_same_dtype(false)
                  .build();
  const char* first = static_cast<const char*>(marks.const_data_ptr());
  iter.for_each(
      [&](char** data, const int64_t* strides, int64_t n0, int64_t n1) {
        for (int64_t j = 0; j < n1; ++j) {
          const int64_t begin = data[0] + j * strides[1] - first;
          f(begin, begin + n0);
        }
      },
      std::max<int64_t>(1, grain));
}

}  // namespace d2l
