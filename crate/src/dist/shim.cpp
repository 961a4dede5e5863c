// A small C interface over libtorch's c10d (the engine of torch.distributed): a TCPStore
// rendezvous, a Gloo process group (CPU) and, where built with NCCL, an NCCL one (CUDA);
// all_reduce, broadcast and barrier with timeouts. Every function catches C++ exceptions and
// returns them as text, so that nothing unwinds into Rust.
//
// Built by crate/build.rs against the installed libtorch's headers with the C++ ABI torch-sys
// uses, plus gloo's headers (Debian's libgloo-dev), which the torch wheel leaves out. Only the
// gloo types that ProcessGroupGloo's options need are touched here: the headers are older than
// the gloo inside libtorch, and the class layouts used across the boundary are c10d's own.
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef D2L_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include "../guard.h"

#include <chrono>
#include <cstring>
#include <string>
#include <vector>

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

using d2l::guarded;

std::vector<at::Tensor> tensors_of(at::Tensor** ts, int n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (int i = 0; i < n; ++i) out.push_back(*ts[i]);
  return out;
}

void wait(const c10::intrusive_ptr<c10d::Work>& work, std::chrono::milliseconds timeout) {
  if (!work->wait(timeout)) {
    throw std::runtime_error("timed out after " + std::to_string(timeout.count()) + " ms");
  }
}

}  // namespace

extern "C" {

// Whether this build has NCCL.
int d2l_dist_has_nccl() {
#ifdef D2L_WITH_NCCL
  return 1;
#else
  return 0;
#endif
}

// Joins the group: one process serves the TCPStore on host:port, the others connect to it; then
// the backend (0: Gloo, 1: NCCL) rendezvous through the store. `iface`, when not empty, is the
// network interface Gloo binds to (GLOO_SOCKET_IFNAME); else `bind_host`.
// `is_server`: this process serves the store (rank 0, unless torchrun's agent already does);
// `prefix` keeps this run's keys apart (torchrun's restarts).
void* d2l_dist_init(const char* host, int port, int rank, int world_size, int backend,
                    int64_t timeout_ms, int is_server, const char* prefix, const char* iface,
                    const char* bind_host, char* err, size_t err_len) {
  Group* group = nullptr;
  int failed = guarded(err, err_len, [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = is_server != 0;
    opts.numWorkers = static_cast<std::size_t>(world_size);
    opts.waitWorkers = true;
    opts.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    c10::intrusive_ptr<c10d::Store> store =
        c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    c10::intrusive_ptr<c10d::Backend> pg;
    if (backend == 0) {
      auto options = c10d::ProcessGroupGloo::Options::create(timeout);
      if (iface != nullptr && iface[0] != '\0') {
        options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(iface));
      } else if (bind_host != nullptr && bind_host[0] != '\0') {
        options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(bind_host));
      } else {
        options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world_size, options);
    } else {
#ifdef D2L_WITH_NCCL
      auto options = c10d::ProcessGroupNCCL::Options::create();
      options->timeout = timeout;
      pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world_size, options);
#else
      throw std::runtime_error("this build of d2l has no NCCL (built against a CPU libtorch)");
#endif
    }
    group = new Group{store, pg, timeout};
  });
  return failed ? nullptr : group;
}

void d2l_dist_free(void* g) { delete static_cast<Group*>(g); }

// Sums (op 0), averages (op 1) or takes the max (op 2) of each tensor across the group, in place.
int d2l_dist_all_reduce(void* g, at::Tensor** ts, int n, int op, char* err, size_t err_len) {
  auto* group = static_cast<Group*>(g);
  return guarded(err, err_len, [&] {
    auto tensors = tensors_of(ts, n);
    c10d::AllreduceOptions opts;
    opts.reduceOp = op == 2 ? c10d::ReduceOp::MAX : c10d::ReduceOp::SUM;
    opts.timeout = group->timeout;
    // Gloo reduces one list of tensors per call (one per device): each tensor a call.
    for (auto& t : tensors) {
      std::vector<at::Tensor> one{t};
      wait(group->backend->allreduce(one, opts), group->timeout);
      if (op == 1) t.div_(group->backend->getSize());
    }
  });
}

// Copies each tensor of rank `root` into the others' tensors, in place.
int d2l_dist_broadcast(void* g, at::Tensor** ts, int n, int root, char* err, size_t err_len) {
  auto* group = static_cast<Group*>(g);
  return guarded(err, err_len, [&] {
    auto tensors = tensors_of(ts, n);
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.timeout = group->timeout;
    for (auto& t : tensors) {
      std::vector<at::Tensor> one{t};
      wait(group->backend->broadcast(one, opts), group->timeout);
    }
  });
}

int d2l_dist_barrier(void* g, char* err, size_t err_len) {
  auto* group = static_cast<Group*>(g);
  return guarded(err, err_len, [&] {
    c10d::BarrierOptions opts;
    opts.timeout = group->timeout;
    wait(group->backend->barrier(opts), group->timeout);
  });
}

}  // extern "C"
