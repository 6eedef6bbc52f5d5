#include "runtime/rpc.h"

#include "common/text.h"
#include "runtime/backend.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>

#if defined(_WIN32)
#define MLLAMA_HAVE_SOCKETS 0
#else
#define MLLAMA_HAVE_SOCKETS 1
#include <dirent.h>
#include <fcntl.h>
#include <arpa/inet.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>
#endif

#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <thread>

namespace mllama {

typedef ggml_backend_reg_t (*rpc_add_server_fn)(const char * endpoint);
typedef void (*rpc_start_server_fn)(const char * endpoint, const char * cache_dir, size_t n_threads, size_t n_devices,
                                    ggml_backend_dev_t * devices);

static ggml_backend_reg_t rpc_registry() { return ggml_backend_reg_by_name("RPC"); }

bool rpc_supported() { return rpc_registry() != nullptr; }

template <typename Fn>
static Fn rpc_proc(const char * name) {
    ggml_backend_reg_t reg = rpc_registry();
    Fn fn = reg ? reinterpret_cast<Fn>(ggml_backend_reg_get_proc_address(reg, name)) : nullptr;
    if (!fn) {
        fail(MLLAMA_ERR_UNSUPPORTED, "this ggml was built without the RPC backend: reinstall libggml-python with "
                                     "CMAKE_ARGS=\"-DGGML_RPC=ON\" (README: Several machines)");
    }
    return fn;
}

// ggml-rpc's aborts become rpc_fault on the thread that called into ggml; other aborts (ggml's
// internal checks) keep the default: the message, then abort().
static ggml_abort_callback_t g_previous_abort = nullptr;

static void on_ggml_abort(const char * message) {
    if (std::strstr(message, "ggml-rpc") != nullptr) throw rpc_fault(message);
    if (g_previous_abort) {
        g_previous_abort(message);
    } else {
        std::fprintf(stderr, "%s\n", message);
    }
}

static void install_abort_hook() {
    static std::once_flag once;
    std::call_once(once, [] { g_previous_abort = ggml_set_abort_callback(on_ggml_abort); });
}

static bool split_endpoint(const std::string & endpoint, std::string & host, std::string & port) {
    const size_t colon = endpoint.rfind(':');
    if (colon == std::string::npos || colon == 0 || colon + 1 == endpoint.size()) return false;
    host = endpoint.substr(0, colon);
    port = endpoint.substr(colon + 1);
    if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
    for (char ch : port) {
        if (ch < '0' || ch > '9') return false;
    }
    return port.size() <= 5 && std::stoi(port) > 0 && std::stoi(port) < 65536;
}

#if MLLAMA_HAVE_SOCKETS
// host's IPv4 addresses (nullptr: none): ggml's RPC client resolves with gethostbyname and connects over
// IPv4 only, its server binds a numeric IPv4 address only.
static addrinfo * resolve_ipv4(const std::string & host, const std::string & port) {
    addrinfo hints{};
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo * found = nullptr;
    if (getaddrinfo(host.c_str(), port.c_str(), &hints, &found) != 0) return nullptr;
    return found;
}

// Fails unless endpoint's host has an IPv4 address, saying why: not found, or IPv6 only.
static void require_ipv4(const std::string & endpoint, const std::string & host, const std::string & port) {
    if (addrinfo * found = resolve_ipv4(host, port)) {
        freeaddrinfo(found);
        return;
    }
    addrinfo hints{};
    hints.ai_socktype = SOCK_STREAM;
    addrinfo * any = nullptr;
    const bool resolves = getaddrinfo(host.c_str(), port.c_str(), &hints, &any) == 0;
    if (any) freeaddrinfo(any);
    if (resolves) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "RPC worker %s: ggml's RPC backend connects over IPv4 only, and %s has no "
             "IPv4 address (name the worker by an IPv4 address or a host name that has one)", endpoint.c_str(),
             host.c_str());
    }
    fail(MLLAMA_ERR_INVALID_ARGUMENT, "RPC worker %s: host '%s' not found", endpoint.c_str(), host.c_str());
}

// A non-blocking connect to one address, waited for up to timeout_ms.
static bool connect_within(const addrinfo * ai, int timeout_ms) {
    const int fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
    if (fd < 0) return false;
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL, 0) | O_NONBLOCK);
    bool ok = connect(fd, ai->ai_addr, ai->ai_addrlen) == 0;
    if (!ok && errno == EINPROGRESS) {
        pollfd p = {fd, POLLOUT, 0};
        int err = 0;
        socklen_t len = sizeof(err);
        ok = poll(&p, 1, timeout_ms) == 1 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0;
    }
    close(fd);
    return ok;
}
#endif

bool endpoint_reachable(const std::string & endpoint, int timeout_ms) {
    std::string host, port;
    if (!split_endpoint(endpoint, host, port)) return false;
#if MLLAMA_HAVE_SOCKETS
    addrinfo * found = resolve_ipv4(host, port);
    if (!found) return false;
    bool ok = false;
    for (addrinfo * ai = found; ai && !ok; ai = ai->ai_next) ok = connect_within(ai, timeout_ms);
    freeaddrinfo(found);
    return ok;
#else
    return true;  // no check here: ggml's own connect reports the failure
#endif
}

std::string rpc_peer(const std::string & endpoint) {
    std::string host, port;
    if (!split_endpoint(endpoint, host, port)) return endpoint;
#if MLLAMA_HAVE_SOCKETS
    addrinfo * found = resolve_ipv4(host, port);
    if (!found) return endpoint;
    char numeric[NI_MAXHOST] = "";
    const bool ok = getnameinfo(found->ai_addr, found->ai_addrlen, numeric, sizeof(numeric), nullptr, 0,
                                NI_NUMERICHOST) == 0;
    freeaddrinfo(found);
    return ok ? std::string(numeric) + ":" + port : endpoint;
#else
    return endpoint;
#endif
}

static std::atomic<bool> g_rpc_used{false};
static std::recursive_mutex g_rpc_calls;

void note_rpc_use() { g_rpc_used = true; }

std::unique_lock<std::recursive_mutex> rpc_exclusive() {
    return g_rpc_used ? std::unique_lock<std::recursive_mutex>(g_rpc_calls) : std::unique_lock<std::recursive_mutex>();
}

static std::mutex g_lost_mutex;
static std::vector<std::string> g_lost;  // endpoints, as ggml keys its connections

void mark_lost(const std::vector<std::string> & endpoints) {
    std::lock_guard<std::mutex> lock(g_lost_mutex);
    for (const std::string & e : endpoints) {
        if (std::find(g_lost.begin(), g_lost.end(), e) == g_lost.end()) g_lost.push_back(e);
    }
}

static bool lost_earlier(const std::string & endpoint) {
    std::lock_guard<std::mutex> lock(g_lost_mutex);
    return std::find(g_lost.begin(), g_lost.end(), endpoint) != g_lost.end();
}

std::vector<std::string> unreachable(const std::vector<std::string> & endpoints, int timeout_ms) {
    std::vector<std::string> out;
    for (const std::string & e : endpoints) {
        if (!endpoint_reachable(e, timeout_ms)) out.push_back(e);
    }
    return out;
}

inline constexpr int k_fault_probe_ms = 2000;  // per endpoint, naming the one that died

std::vector<std::string> lost_workers(const std::vector<std::string> & endpoints, bool * all_answer) {
    std::vector<std::string> dead = unreachable(endpoints, k_fault_probe_ms);
    if (all_answer) *all_answer = dead.empty();
    mark_lost(dead);  // (when all answer, which one failed is not known: none is marked, a new load finds out)
    return dead.empty() ? endpoints : dead;
}

#if MLLAMA_HAVE_SOCKETS
static bool same_peer(const sockaddr_storage & peer, const addrinfo * ai) {
    if (peer.ss_family != ai->ai_family) return false;
    if (peer.ss_family == AF_INET) {
        const auto * a = reinterpret_cast<const sockaddr_in *>(&peer);
        const auto * b = reinterpret_cast<const sockaddr_in *>(ai->ai_addr);
        return a->sin_port == b->sin_port && a->sin_addr.s_addr == b->sin_addr.s_addr;
    }
    const auto * a = reinterpret_cast<const sockaddr_in6 *>(&peer);
    const auto * b = reinterpret_cast<const sockaddr_in6 *>(ai->ai_addr);
    return a->sin6_port == b->sin6_port && std::memcmp(&a->sin6_addr, &b->sin6_addr, sizeof(a->sin6_addr)) == 0;
}

// Calls fn(fd) for each of this process's TCP connections to host:port (found through /proc/self/fd: Linux).
template <typename Fn>
static void for_connections(const std::string & host, const std::string & port, Fn && fn) {
    addrinfo hints{};
    hints.ai_socktype = SOCK_STREAM;
    addrinfo * found = nullptr;
    if (getaddrinfo(host.c_str(), port.c_str(), &hints, &found) != 0) return;
    if (DIR * dir = opendir("/proc/self/fd")) {
        while (dirent * entry = readdir(dir)) {
            const int fd = std::atoi(entry->d_name);
            struct stat st{};
            sockaddr_storage peer{};
            socklen_t len = sizeof(peer);
            if (fd <= 2 || fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode)) continue;
            if (getpeername(fd, reinterpret_cast<sockaddr *>(&peer), &len) != 0) continue;
            for (addrinfo * ai = found; ai; ai = ai->ai_next) {
                if (same_peer(peer, ai)) {
                    fn(fd);
                    break;
                }
            }
        }
        closedir(dir);
    }
    freeaddrinfo(found);
}

// Shuts down the connections to host:port, so that a ggml call blocked reading from one returns (and fails).
static void shutdown_connections(const std::string & host, const std::string & port) {
    for_connections(host, port, [](int fd) { shutdown(fd, SHUT_RDWR); });
}
#endif

void set_io_timeouts(const std::vector<std::string> & endpoints, int seconds) {
#if MLLAMA_HAVE_SOCKETS
    for (const std::string & endpoint : endpoints) {
        std::string host, port;
        if (!split_endpoint(endpoint, host, port)) continue;
        for_connections(host, port, [seconds](int fd) {
            timeval tv{};
            tv.tv_sec = seconds;
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
            setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
        });
    }
#else
    (void) endpoints;
    (void) seconds;
#endif
}

rpc_outcome run_within(const std::string & endpoint, int timeout_ms, std::function<void()> call) {
    struct attempt {
        std::mutex mutex;
        std::condition_variable done_cv;
        bool done = false;
        std::string error;
    };
    auto a = std::make_shared<attempt>();
    std::thread worker([a, call = std::move(call)] {
        std::string error;
        try {
            call();
        } catch (const std::exception & e) {
            error = e.what();
        }
        std::lock_guard<std::mutex> lock(a->mutex);
        a->error = error;
        a->done = true;
        a->done_cv.notify_all();
    });
    std::unique_lock<std::mutex> lock(a->mutex);
    bool answered = a->done_cv.wait_for(lock, std::chrono::milliseconds(timeout_ms), [&] { return a->done; });
#if MLLAMA_HAVE_SOCKETS
    if (!answered) {
        std::string host, port;
        split_endpoint(endpoint, host, port);
        shutdown_connections(host, port);
        a->done_cv.wait_for(lock, std::chrono::seconds(5), [&] { return a->done; });
    }
#endif
    const bool finished = a->done;
    const std::string error = a->error;
    lock.unlock();
    if (finished) {
        worker.join();
    } else {
        worker.detach();  // still blocked in ggml: nothing more can be done from here
    }
    return {answered, error};
}

// ggml's add_server, given timeout_ms to complete its handshake: it blocks without limit on a peer
// that accepts the connection and never answers (a service that is not a ggml RPC server).
static ggml_backend_reg_t add_server_within(rpc_add_server_fn add_server, const std::string & endpoint,
                                            int timeout_ms) {
    auto reg = std::make_shared<ggml_backend_reg_t>(nullptr);
    const rpc_outcome outcome = run_within(endpoint, timeout_ms, [reg, add_server, endpoint] {
        *reg = add_server(endpoint.c_str());
    });
    if (!outcome.answered) {
        fail(MLLAMA_ERR_BACKEND, "RPC worker %s accepted the connection but did not answer ggml's RPC handshake "
             "within %d ms: not a ggml RPC server, or it is serving another client?", endpoint.c_str(), timeout_ms);
    }
    if (!outcome.error.empty()) {
        fail(MLLAMA_ERR_BACKEND, "RPC worker %s: not a ggml RPC server (%s)", endpoint.c_str(), outcome.error.c_str());
    }
    return *reg;
}

std::vector<ggml_backend_dev_t> rpc_connect(const std::string & endpoint, int timeout_ms) {
    auto add_server = rpc_proc<rpc_add_server_fn>("ggml_backend_rpc_add_server");
    install_abort_hook();
    std::string host, port;
    if (!split_endpoint(endpoint, host, port)) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "RPC endpoint '%s' is not host:port", endpoint.c_str());
    }
#if MLLAMA_HAVE_SOCKETS
    require_ipv4(endpoint, host, port);
#endif
    if (endpoint.front() == '[') {  // ([an IPv4 address]: ggml's own parser reads no brackets)
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "RPC worker %s: name it as host:port, without brackets", endpoint.c_str());
    }
    if (lost_earlier(endpoint)) {
        fail(MLLAMA_ERR_BACKEND, "RPC worker %s was lost earlier in this process, and ggml keeps its broken "
             "connection until the process ends: restart this process to use the worker again, or name it by "
             "another address of its machine (README: Faults)", endpoint.c_str());
    }
    if (!endpoint_reachable(endpoint, timeout_ms)) {
        fail(MLLAMA_ERR_BACKEND, "RPC worker %s: no answer within %d ms (is `mllama rpc-server` running there?)",
             endpoint.c_str(), timeout_ms);
    }
    ggml_backend_reg_t reg = add_server_within(add_server, endpoint, timeout_ms);
    if (!reg || ggml_backend_reg_dev_count(reg) == 0) {
        fail(MLLAMA_ERR_BACKEND, "RPC worker %s refused the connection: not a ggml RPC server of protocol %s, or it "
             "is serving another client", endpoint.c_str(), "5.x");
    }
    std::vector<ggml_backend_dev_t> devices;
    for (size_t i = 0; i < ggml_backend_reg_dev_count(reg); ++i) devices.push_back(ggml_backend_reg_dev_get(reg, i));
    return devices;
}

std::string rpc_endpoint(ggml_backend_dev_t dev) {
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    if (!reg || std::strcmp(ggml_backend_reg_name(reg), "RPC") != 0) return "";
    return ggml_backend_dev_description(dev);  // ggml-rpc describes its devices by their endpoint
}

static std::vector<ggml_backend_dev_t> served_devices(const std::string & names) {
    std::vector<std::string> list = split_list(names.c_str());
    if (list.empty()) list.emplace_back("");  // the first GPU, else the CPU
    std::vector<ggml_backend_dev_t> devices;
    for (const std::string & name : list) devices.push_back(select_device(name.c_str()));
    return devices;
}

void rpc_serve(const std::string & endpoint, const std::string & devices, int n_threads,
               const std::string & cache_dir) {
    auto start_server = rpc_proc<rpc_start_server_fn>("ggml_backend_rpc_start_server");
    std::string host, port;
    if (!split_endpoint(endpoint, host, port)) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "RPC endpoint '%s' is not host:port", endpoint.c_str());
    }
#if MLLAMA_HAVE_SOCKETS
    in_addr numeric{};
    if (inet_pton(AF_INET, host.c_str(), &numeric) != 1) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "RPC server address '%s': ggml's RPC server binds a numeric IPv4 address "
             "(127.0.0.1, 0.0.0.0 or one of this machine's)", host.c_str());
    }
#endif
    std::vector<ggml_backend_dev_t> served = served_devices(devices);
    for (ggml_backend_dev_t dev : served) {
        if (!rpc_endpoint(dev).empty()) fail(MLLAMA_ERR_INVALID_ARGUMENT, "a worker cannot serve an RPC device");
    }
    const size_t threads = static_cast<size_t>(n_threads > 0 ? n_threads : physical_core_count());
    start_server(endpoint.c_str(), cache_dir.empty() ? nullptr : cache_dir.c_str(), threads, served.size(),
                 served.data());
    fail(MLLAMA_ERR_BACKEND, "the RPC server at %s stopped (is the port taken?)", endpoint.c_str());
}

}  // namespace mllama
