// ggml's RPC backend, reached only through the backend registry ("RPC" and its proc addresses), so
// the same mllama build runs with a ggml built with or without -DGGML_RPC=ON. No network code of
// our own beyond a reachability check: the protocol, the server and the transport are ggml's.
//
// Faults: ggml-rpc aborts the process when a worker dies or answers nonsense (GGML_ABORT). mllama
// installs an abort callback that turns the aborts raised inside ggml-rpc into an `rpc_fault`
// exception on the calling thread (other aborts keep ggml's behaviour), so that a lost worker is a
// status code naming the endpoint instead of a dead process.
#pragma once

#include "common/error.h"

#include <functional>
#include <string>
#include <vector>

struct ggml_backend_device;
typedef struct ggml_backend_device * ggml_backend_dev_t;

namespace mllama {

// A worker failed while in use (connection lost, malformed answer). The message is ggml's.
struct rpc_fault : error {
    explicit rpc_fault(const std::string & msg) : error(MLLAMA_ERR_BACKEND, msg) {}
};

// Defaults of mllama_model_params.rpc_timeout_ms and rpc_io_timeout_s.
inline constexpr int k_default_rpc_timeout_ms = 10000;
inline constexpr int k_default_rpc_io_timeout_s = 600;

// Runs a ggml free of something that may live on a lost worker: ggml-rpc aborts there (an rpc_fault
// here), the memory is gone with the worker, so the fault is dropped; returns whether there was one.
template <typename F>
bool free_quietly(F && free_fn) {
    try {
        free_fn();
        return false;
    } catch (const rpc_fault &) {
        return true;
    }
}

// The loaded ggml has the RPC backend (-DGGML_RPC=ON).
bool rpc_supported();

// Connects to the worker at "host:port" and returns its devices (ggml names them RPC0, RPC1, ...
// process-wide; their description is the endpoint). Fails with MLLAMA_ERR_BACKEND naming the
// endpoint within about timeout_ms when nothing answers there, or when it is not a ggml RPC server
// of this protocol version; with MLLAMA_ERR_UNSUPPORTED when ggml was built without RPC.
std::vector<ggml_backend_dev_t> rpc_connect(const std::string & endpoint, int timeout_ms);

// What endpoint ("host:port") names: its first IPv4 address (what ggml connects to), numeric ("127.0.0.1:50052");
// the endpoint itself when it has none (rpc_connect then says why).
std::string rpc_peer(const std::string & endpoint);

// The endpoint of an RPC device ("" for other devices).
std::string rpc_endpoint(ggml_backend_dev_t dev);

// TCP reachability of "host:port" within timeout_ms (a connect, closed at once).
bool endpoint_reachable(const std::string & endpoint, int timeout_ms);

// Runs call() (a ggml call that may open a connection to endpoint and wait on it) on a helper thread, waiting up to
// timeout_ms: ggml blocks without limit on a worker that stopped answering before set_io_timeouts bounds its
// connection (ggml opens a new one whenever none is held). Past the limit the connections to endpoint are shut
// down, so that ggml's call fails; `answered` is then false. `error`: what call() threw (a fault), else "".
struct rpc_outcome {
    bool answered;
    std::string error;
};
rpc_outcome run_within(const std::string & endpoint, int timeout_ms, std::function<void()> call);

// Bounds how long this process's connections to these workers wait for an answer (or to send):
// seconds per call, after which ggml's call fails (an rpc_fault) instead of blocking on a worker
// that stopped answering. Linux (the connections are found through /proc/self/fd); elsewhere a no-op.
void set_io_timeouts(const std::vector<std::string> & endpoints, int seconds);

// Workers lost while in use: ggml keeps one connection per endpoint string for the life of the process,
// broken from then on, so rpc_connect refuses these endpoints at once (saying why) instead of failing later.
void mark_lost(const std::vector<std::string> & endpoints);

// After an rpc_fault: the endpoints among these that no longer accept a connection, marked lost (all of them,
// none marked, when each still does: a frozen worker; *all_answer then true); for the fault's message.
std::vector<std::string> lost_workers(const std::vector<std::string> & endpoints, bool * all_answer = nullptr);

// The endpoints among `endpoints` that do not accept a connection now (for fault messages).
std::vector<std::string> unreachable(const std::vector<std::string> & endpoints, int timeout_ms);

// Serves the devices named (comma list; "" the first GPU, else the CPU) at endpoint until the
// process ends; cache_dir (or "") is ggml's local tensor cache. Blocks.
void rpc_serve(const std::string & endpoint, const std::string & devices, int n_threads, const std::string & cache_dir);

}  // namespace mllama
