// Running libmilter: configuration, the listener thread, stop and drain,
// and which environment owns all of it.
//
// The listener runs on a thread of its own (pthread_create, so a failure
// becomes a JavaScript error rather than std::thread's abort under
// -fno-exceptions), not on an AsyncWorker: the libuv pool has four threads
// shared with fs and dns, and the listener holds its thread for the milter's
// whole life. The thread blocks every asynchronous signal before entering
// libmilter, and libmilter's worker threads inherit that mask, so no signal
// meant for Node (TERM, INT, HUP, USR1, USR2, PIPE, CHLD, WINCH, ALRM...) is
// ever taken by them; the synchronous fault signals (SEGV, BUS, FPE, ILL,
// ABRT, TRAP, SYS) stay deliverable, so a crash on a libmilter thread
// reaches Node's or the sanitizer's handler, and so does the addon's own
// wake-up signal (WakeHandler), which only the addon sends. We call Debian's exported
// mi_listener() directly, which serves without smfi_main's signal thread
// (that thread sigwait()s SIGHUP/SIGTERM/SIGINT and would steal them from
// Node). mi_listener is declared weak: without it, main() refuses unless
// the smfi_main fallback was asked for.
//
// The threads are named "nodemilter" (libmilter's workers inherit the name
// from the listener), so they can be told apart in top, gdb and /proc.

#include <pthread.h>
#include <signal.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <dirent.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "engine.h"

namespace nodemilter {

Addon& State() {
  // Never destroyed: libmilter threads may still run while the process exits.
  static Addon* addon = new Addon();
  return *addon;
}

EnvData* Env(Napi::Env env) {
  EnvData* d = nullptr;
  napi_get_instance_data(env, reinterpret_cast<void**>(&d));
  return d;
}

bool ClaimOwner(Napi::Env env, const char* what) {
  Addon& a = State();
  EnvData* mine = Env(env);
  std::lock_guard<std::mutex> lk(a.envmu);
  if (a.owner == nullptr && mine != nullptr) a.owner = mine;
  if (a.owner == mine) return true;
  Napi::Error::New(env, std::string(what) +
                            ": libmilter is already in use by another load of the nodemilter addon in this process "
                            "(another worker thread, or a second load after require.cache was cleared); libmilter "
                            "runs one milter per process, configured from the load that started it")
      .ThrowAsJavaScriptException();
  return false;
}

namespace {

// Everything but the synchronous fault signals.
void AsyncSignals(sigset_t* set) {
  sigfillset(set);
  for (int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT, SIGTRAP, SIGSYS}) sigdelset(set, sig);
}

}  // namespace

namespace {

struct ThreadStart {
  void* (*fn)(void*);
  void* arg;
};

// Names the thread before it runs anything, so that threads it starts
// (libmilter's pool) inherit the name.
void* NamedThread(void* p) {
  ThreadStart start = *static_cast<ThreadStart*>(p);
  delete static_cast<ThreadStart*>(p);
  pthread_setname_np(pthread_self(), "nodemilter");
  PrepareThreadForCrash(THREAD_ADDON);
  return start.fn(start.arg);
}

}  // namespace

bool StartThread(void* (*fn)(void*), void* arg) {
  // The new thread starts with the creator's mask: block around the create
  // so that not even its first instruction can take a signal meant for Node.
  sigset_t block, old;
  AsyncSignals(&block);
  pthread_sigmask(SIG_BLOCK, &block, &old);
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  pthread_t t;
  ThreadStart* start = new ThreadStart{fn, arg};
  const int rc = pthread_create(&t, &attr, NamedThread, start);
  pthread_attr_destroy(&attr);
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  if (rc != 0) {
    delete start;
    State().threads_failed.fetch_add(1);
    errno = rc;
    return false;
  }
  return true;
}

}  // namespace nodemilter

// Debian's libmilter exports it (see its symbols file); upstream keeps it
// internal. Weak, so that an addon linked against a libmilter without it
// still loads and says so (hasListener) instead of failing to load.
extern "C" int mi_listener(char*, int, smfiDesc_ptr, time_t, int) __attribute__((weak));

namespace nodemilter {

namespace {

Napi::Value Throw(Napi::Env env, const std::string& msg) {
  Napi::Error::New(env, msg).ThrowAsJavaScriptException();
  return env.Undefined();
}

// The calls that configure or run libmilter: only from its owner.
#define OWNER_ONLY(info, what) \
  if (!ClaimOwner((info).Env(), what)) return (info).Env().Undefined()

Napi::Value Version(const Napi::CallbackInfo& info) {
  unsigned int major = 0, minor = 0, pl = 0;
  smfi_version(&major, &minor, &pl);
  Napi::Array out = Napi::Array::New(info.Env(), 3);
  out.Set(0u, major);
  out.Set(1u, minor);
  out.Set(2u, pl);
  return out;
}

Napi::Value SetConn(const Napi::CallbackInfo& info) {
  OWNER_ONLY(info, "setconn()");
  Addon& a = State();
  // libmilter keeps the socket it opened and ignores a new address.
  if (a.socket_opened) return Throw(info.Env(), "setconn() after opensocket(): the listening socket is already open on " + a.conn_spec);
  std::string spec = info[0].As<Napi::String>().Utf8Value();
  if (smfi_setconn(const_cast<char*>(spec.c_str())) != MI_SUCCESS) return Throw(info.Env(), "smfi_setconn failed");
  a.conn_spec = spec;
  a.conn_set = true;
  return info.Env().Undefined();
}

Napi::Value SetTimeout(const Napi::CallbackInfo& info) {
  OWNER_ONLY(info, "settimeout()");
  const int t = info[0].As<Napi::Number>().Int32Value();
  State().timeout = t;
  smfi_settimeout(t);
  return info.Env().Undefined();
}

Napi::Value SetBacklog(const Napi::CallbackInfo& info) {
  OWNER_ONLY(info, "setbacklog()");
  const int b = info[0].As<Napi::Number>().Int32Value();
  if (smfi_setbacklog(b) != MI_SUCCESS) return Throw(info.Env(), "smfi_setbacklog failed");
  State().backlog = b;
  return info.Env().Undefined();
}

Napi::Value SetDbg(const Napi::CallbackInfo& info) {
  OWNER_ONLY(info, "setdbg()");
  const int d = info[0].As<Napi::Number>().Int32Value();
  State().dbg = d;
  smfi_setdbg(d);
  return info.Env().Undefined();
}

// Calls fn(fd) for every descriptor open in this process.
template <typename F>
void EachOpenFd(F fn) {
  // Only the descriptors that are open: /proc/self/fd lists them.
  if (DIR* d = opendir("/proc/self/fd")) {
    const int self = dirfd(d);
    while (dirent* e = readdir(d)) {
      if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
      const int fd = atoi(e->d_name);
      if (fd != self) fn(fd);
    }
    closedir(d);
  } else {
    for (int fd = 0; fd < 1024; fd++)
      if (fcntl(fd, F_GETFD) != -1) fn(fd);
  }
}

bool IsListeningStream(int fd) {
  int listening = 0, type = 0;
  socklen_t len = sizeof(int);
  if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) != 0 || !listening) return false;
  len = sizeof(int);
  return getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) == 0 && type == SOCK_STREAM;
}

// libmilter keeps its listening descriptor to itself. It is the listening
// socket that smfi_opensocket created (the one new listening stream socket:
// JavaScript is inside this call, and nothing else in the process opens
// listening sockets from another thread), or, for `fd:N`, N itself
// (libmilter serves that descriptor as it is, checked with Debian's 8.17).
// Unknown (-1) when neither holds: stopAccepting() then says so.
int FindListenFd(const std::vector<int>& before, const std::string& spec) {
  int found = -1, count = 0;
  EachOpenFd([&](int fd) {
    bool old = false;
    for (int b : before) old = old || b == fd;
    if (!old && IsListeningStream(fd)) {
      found = fd;
      count++;
    }
  });
  if (count == 1) return found;
  if (count == 0 && spec.compare(0, 3, "fd:") == 0) {
    char* end = nullptr;
    const long n = strtol(spec.c_str() + 3, &end, 10);
    if (end && *end == '\0' && n >= 0 && n < 1 << 20 && IsListeningStream(static_cast<int>(n))) return static_cast<int>(n);
  }
  return -1;
}

Napi::Value OpenSocket(const Napi::CallbackInfo& info) {
  OWNER_ONLY(info, "opensocket()");
  Addon& a = State();
  const bool rm = info[0].ToBoolean();
  if (a.socket_opened) return info.Env().Undefined();
  std::vector<int> before;
  EachOpenFd([&](int fd) { before.push_back(fd); });
  errno = 0;
  if (smfi_opensocket(rm) != MI_SUCCESS) {
    const int e = errno;
    return Throw(info.Env(), std::string("could not open the milter socket") + (e ? std::string(": ") + strerror(e) : ""));
  }
  a.socket_opened = true;
  a.listen_fd = FindListenFd(before, a.conn_spec);
  struct stat st;
  if (a.listen_fd >= 0 && fstat(a.listen_fd, &st) == 0) {
    a.listen_dev = st.st_dev;
    a.listen_ino = st.st_ino;
  } else {
    a.listen_fd = -1;
  }
  return info.Env().Undefined();
}

std::vector<std::string> StringArray(const Napi::Value& v) {
  std::vector<std::string> out;
  if (!v.IsArray()) return out;
  Napi::Array arr = v.As<Napi::Array>();
  for (uint32_t i = 0; i < arr.Length(); i++) out.push_back(arr.Get(i).ToString().Utf8Value());
  return out;
}

int64_t IntProp(const Napi::Object& o, const char* key, int64_t dflt) {
  Napi::Value v = o.Get(key);
  return v.IsNumber() ? v.As<Napi::Number>().Int64Value() : dflt;
}

// register({name, actions, steps, handled, noreply, dynamicNegotiate,
//           symlists[7], deadlines[EV_COUNT], progressMs, fallbackStatus, watch[],
//           maxSessions, sessionCapClose, allowSmfiMain, spinUs})
Napi::Value Register(const Napi::CallbackInfo& info) {
  OWNER_ONLY(info, "register()");
  Napi::Env env = info.Env();
  Addon& a = State();
  if (a.started.load()) return Throw(env, "register() after main()");
  Napi::Object o = info[0].As<Napi::Object>();
  Registration& r = a.reg;
  r.name = o.Get("name").ToString().Utf8Value();
  r.actions = IntProp(o, "actions", -1);
  r.steps = IntProp(o, "steps", -1);
  r.handled = static_cast<uint32_t>(IntProp(o, "handled", 0));
  r.noreply = static_cast<uint32_t>(IntProp(o, "noreply", 0));
  r.dynamic_negotiate = o.Get("dynamicNegotiate").ToBoolean();
  std::vector<std::string> sym = StringArray(o.Get("symlists"));
  for (int i = 0; i < 7; i++) r.symlists[i] = i < static_cast<int>(sym.size()) ? sym[i] : std::string();
  Napi::Value dl = o.Get("deadlines");
  for (int i = 0; i < EV_COUNT; i++) {
    r.deadline_ms[i] = 8000;
    if (dl.IsArray()) {
      Napi::Value v = dl.As<Napi::Array>().Get(static_cast<uint32_t>(i));
      if (v.IsNumber()) r.deadline_ms[i] = v.As<Napi::Number>().Int64Value();
    }
  }
  r.progress_ms = IntProp(o, "progressMs", 4000);
  r.fallback_status = static_cast<int>(IntProp(o, "fallbackStatus", SMFIS_TEMPFAIL));
  r.watch = StringArray(o.Get("watch"));
  r.max_sessions = IntProp(o, "maxSessions", 1000);
  r.cap_closes = o.Get("sessionCapClose").ToBoolean();
  a.allow_smfi_main = o.Get("allowSmfiMain").ToBoolean();
  // The spin (Addon::spin_ns): never on one CPU, where it would keep
  // JavaScript from answering. The JavaScript layer checked the value, and
  // passes the CPUs the process may run on (os.availableParallelism(), the
  // count the event-loop spin uses: affinity, not the machine's CPUs, so a
  // process pinned to one CPU of many does not spin); the machine's count
  // only when it did not.
  const int64_t given = IntProp(o, "cpus", 0);
  const long cpus = given > 0 ? static_cast<long>(given) : std::max(1L, sysconf(_SC_NPROCESSORS_ONLN));
  a.spin_ns = cpus < 2 ? 0 : std::min<int64_t>(std::max<int64_t>(IntProp(o, "spinUs", 50), 0), 1000) * 1000;
  a.spin_below_sessions = static_cast<uint64_t>(cpus);

  a.desc = Callbacks();
  a.desc.xxfi_name = const_cast<char*>(r.name.c_str());
  a.desc.xxfi_flags = r.actions < 0 ? (SMFIF_ADDHDRS | SMFIF_CHGBODY | SMFIF_ADDRCPT | SMFIF_DELRCPT | SMFIF_CHGHDRS |
                                       SMFIF_QUARANTINE | SMFIF_CHGFROM | SMFIF_ADDRCPT_PAR | SMFIF_SETSYMLIST)
                                    : static_cast<unsigned long>(r.actions);
  if (smfi_register(a.desc) != MI_SUCCESS) return Throw(env, "smfi_register failed");
  r.registered = true;
  return env.Undefined();
}

void NotifyStopped(int rc, bool via_main) {
  Addon& a = State();
  a.running.store(false);
  Event* ev = new Event();
  ev->type = EV_STOPPED;
  if (rc != MI_SUCCESS) ev->error = "libmilter's listener failed (see syslog for libmilter's reason)";
  else if (!a.stop_requested.load())
    ev->error = via_main ? "smfi_main returned although stop() was not called (a signal reached libmilter)"
                         : "libmilter's listener returned although stop() was not called";
  Enqueue(ev);
}

// The listener's wake-up: a real-time signal with a handler that does
// nothing, sent with pthread_kill to the listener thread only. libmilter's
// accept loop holds its listener mutex across a poll() of up to five
// seconds (MI_CHK_TIME); smfi_stop waits for that mutex, and after
// StopAccepting no connection can end the poll early. The signal does: the
// poll fails with EINTR, which mi_listener takes as "check the stop flag
// and poll again". The signal is unblocked on the listener thread (and on
// the pool threads it starts, which inherit its mask; nothing sends it to
// them, and SA_RESTART restarts their other calls). It is SIGRTMIN+4 unless
// something else handles that one: then the next real-time signal nobody
// handles (nothing in Node uses them; glibc keeps its own below SIGRTMIN).
void WakeHandler(int) {}

int InstallWakeSignal() {
  for (int sig = SIGRTMIN + 4; sig <= SIGRTMAX; sig++) {
    struct sigaction old;
    if (sigaction(sig, nullptr, &old) != 0) continue;
    if (!(old.sa_flags & SA_SIGINFO) && old.sa_handler == WakeHandler) return sig;
    if ((old.sa_flags & SA_SIGINFO) || old.sa_handler != SIG_DFL) continue;  // someone else's
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = WakeHandler;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(sig, &sa, nullptr) == 0) return sig;
  }
  return 0;
}

void* ListenerThread(void*) {
  PrepareThreadForCrash(THREAD_LISTENER);
  Addon& a = State();
  {
    std::lock_guard<std::mutex> lk(a.lmu);
    a.listener_thread = pthread_self();
    a.listener_live = true;
  }
  if (a.wake_signal) {
    sigset_t wake;
    sigemptyset(&wake);
    sigaddset(&wake, a.wake_signal);
    pthread_sigmask(SIG_UNBLOCK, &wake, nullptr);
  }
  int rc;
  if (mi_listener) {
    rc = mi_listener(const_cast<char*>(a.conn_spec.c_str()), a.dbg, &a.desc, a.timeout,
                     a.backlog > 0 ? a.backlog : SOMAXCONN);
  } else {
    a.used_smfi_main = true;
    rc = smfi_main();
  }
  {
    std::lock_guard<std::mutex> lk(a.lmu);
    a.listener_live = false;
  }
  NotifyStopped(rc, !mi_listener);
  return nullptr;
}

void* StopThread(void*) {
  smfi_stop();
  return nullptr;
}

// main(): start serving; the returned promise lives in TypeScript.
Napi::Value Main(const Napi::CallbackInfo& info) {
  OWNER_ONLY(info, "main()");
  Napi::Env env = info.Env();
  Addon& a = State();
  if (a.started.load()) return Throw(env, "main() was already called: libmilter runs once per process");
  if (!a.reg.registered) return Throw(env, "register() must be called before main()");
  if (!a.conn_set) return Throw(env, "setconn() must be called before main()");
  if (!mi_listener && !a.allow_smfi_main)
    return Throw(env,
                 "this libmilter does not export mi_listener, and smfi_main would hand SIGTERM, SIGINT and SIGHUP to "
                 "libmilter's signal thread; set NODEMILTER_ALLOW_SMFI_MAIN=1 to run on smfi_main anyway "
                 "(see docs/native.md), or use the TypeScript engine");
  {
    std::lock_guard<std::mutex> lk(a.qmu);
    if (!a.tsfn_live) return Throw(env, "event channel is not open");
  }
  // smfi_main has a signal thread of its own; only mi_listener gets the wake-up.
  if (mi_listener) a.wake_signal = InstallWakeSignal();
  a.started.store(true);
  a.running.store(true);
  if (!StartThread(ListenerThread, nullptr)) {
    const int e = errno;
    a.started.store(false);
    a.running.store(false);
    return Throw(env, std::string("could not start libmilter's listener thread: ") + strerror(e));
  }
  return env.Undefined();
}

// stop(): ask libmilter to stop. smfi_stop() can block for seconds, so it
// runs on a thread of its own; the listener's return is reported as an event.
Napi::Value Stop(const Napi::CallbackInfo& info) {
  OWNER_ONLY(info, "stop()");
  Addon& a = State();
  if (!a.started.load()) return Throw(info.Env(), "stop() before main()");
  if (a.stop_requested.exchange(true)) return info.Env().Undefined();
  if (!StartThread(StopThread, nullptr)) {
    const int e = errno;
    a.stop_requested.store(false);
    return Throw(info.Env(), std::string("could not start the thread that stops libmilter: ") + strerror(e));
  }
  return info.Env().Undefined();
}

// wake(): interrupt the listener's poll (see WakeHandler), so that a stop
// requested with stop() is seen now rather than after the poll's five
// seconds. Returns whether a signal was sent.
Napi::Value Wake(const Napi::CallbackInfo& info) {
  OWNER_ONLY(info, "wake()");
  Addon& a = State();
  bool sent = false;
  {
    // Under the lock the listener thread has not returned (it clears
    // listener_live under the same lock first), so the thread id is valid.
    std::lock_guard<std::mutex> lk(a.lmu);
    if (a.listener_live && a.wake_signal) sent = pthread_kill(a.listener_thread, a.wake_signal) == 0;
  }
  return Napi::Boolean::New(info.Env(), sent);
}

// A listening socket nobody can connect to and that is never readable: a
// unix socket bound in a fresh private directory, listening, then unlinked
// with its directory. Non-blocking, so an accept() on it fails with EAGAIN.
int UnreachableListener(std::string* why) {
  const char* tmp = getenv("TMPDIR");
  std::string dir = std::string(tmp && *tmp ? tmp : "/tmp") + "/nodemilter-XXXXXX";
  std::vector<char> buf(dir.begin(), dir.end());
  buf.push_back('\0');
  if (!mkdtemp(buf.data())) {
    *why = std::string("mkdtemp in ") + (tmp && *tmp ? tmp : "/tmp") + ": " + strerror(errno);
    return -1;
  }
  std::string path = std::string(buf.data()) + "/s";
  sockaddr_un addr;
  memset(&addr, 0, sizeof(addr));
  addr.sun_family = AF_UNIX;
  int fd = -1;
  if (path.size() >= sizeof(addr.sun_path)) {
    *why = "temporary directory path too long for a unix socket: " + path;
  } else {
    memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0 || bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || listen(fd, 1) != 0) {
      *why = std::string("a private unix socket: ") + strerror(errno);
      if (fd >= 0) close(fd);
      fd = -1;
    }
    unlink(path.c_str());
  }
  rmdir(buf.data());
  return fd;
}

// stopAccepting(): this process accepts no new connection from now on,
// while libmilter keeps serving the sessions it has. The listening socket
// may be shared with other processes (workers given the supervisor's
// `fd:`), so nothing is done to it that they could see: no shutdown(), no
// close of the last reference, no unlink. Instead, in this process only,
// the descriptor number libmilter polls is pointed at another socket, one
// that never becomes readable (UnreachableListener), with one atomic
// dup3(). From libmilter's side (listener.c in 8.17):
//  - mi_listener polls `listenfd` for POLLIN, up to MI_CHK_TIME (5 s) at a
//    time, and accepts only when the poll says readable. The unreachable
//    socket is never readable and, listening, never reports POLLHUP or
//    POLLERR (an error there would end the listener with MI_FAILURE).
//  - A poll in flight at the dup3 keeps its wait on the old socket, but
//    Linux looks the number up again each time it wakes, finds the new
//    socket, not readable, and sleeps on to its timeout. A poll that had
//    already returned readable calls accept() on the new socket: EAGAIN,
//    which mi_listener retries silently (EAGAIN is in its list of accept
//    errors that are not counted toward its give-up limit).
//  - Connections that arrive stay in the shared socket's kernel queue for
//    the processes that still accept on it.
//  - Sessions already accepted run on libmilter's pool threads with their
//    own descriptors: untouched.
//  - smfi_stop() closes `listenfd`, now the unreachable socket (this
//    process's reference to the shared one went at the dup3), and, for a
//    unix socket path it created, removes the path as it would anyway;
//    for `fd:` it removes nothing. wake() ends the poll so the stop is
//    seen at once.
// Throws when it cannot (libmilter not running, its descriptor unknown);
// the caller then drains by refusing instead.
Napi::Value StopAccepting(const Napi::CallbackInfo& info) {
  OWNER_ONLY(info, "stopAccepting()");
  Napi::Env env = info.Env();
  Addon& a = State();
  if (a.accepting_stopped.load()) return env.Undefined();
  if (!a.started.load() || !a.running.load()) return Throw(env, "stopAccepting(): libmilter is not running");
  if (a.stop_requested.load()) return Throw(env, "stopAccepting(): stop() was already called");
  if (a.used_smfi_main) return Throw(env, "stopAccepting(): libmilter runs on smfi_main, whose listener cannot be told apart");
  if (a.listen_fd < 0) return Throw(env, "stopAccepting(): libmilter's listening descriptor was not found when the socket opened (" + a.conn_spec + ")");
  struct stat st;
  if (fstat(a.listen_fd, &st) != 0 || st.st_dev != a.listen_dev || st.st_ino != a.listen_ino)
    return Throw(env, "stopAccepting(): descriptor " + std::to_string(a.listen_fd) + " is no longer libmilter's listening socket");
  std::string why;
  const int quiet = UnreachableListener(&why);
  if (quiet < 0) return Throw(env, "stopAccepting(): could not create " + why);
  const int rc = dup3(quiet, a.listen_fd, O_CLOEXEC);
  const int e = errno;
  close(quiet);
  if (rc < 0) return Throw(env, std::string("stopAccepting(): dup3: ") + strerror(e));
  a.accepting_stopped.store(true);
  return env.Undefined();
}

// nodelay(port): turn Nagle's algorithm off on libmilter's listening TCP
// socket; Linux hands the setting down to every accepted connection.
// libmilter writes an end-of-message reply as several small packets (one
// per action, then the verdict); with Nagle on, the second packet waits for
// the MTA's delayed ACK, about 40 ms a message. libmilter does not expose
// its socket, so find it: the listening stream socket bound to `port`.
// Returns how many sockets were changed.
bool TuneIfListener(int fd, int port) {
  if (!IsListeningStream(fd)) return false;
  sockaddr_storage ss;
  socklen_t sl = sizeof(ss);
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &sl) != 0) return false;
  int p = -1;
  if (ss.ss_family == AF_INET) p = ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
  else if (ss.ss_family == AF_INET6) p = ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port);
  if (p != port) return false;
  int one = 1;
  return setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) == 0;
}

Napi::Value NoDelay(const Napi::CallbackInfo& info) {
  OWNER_ONLY(info, "nodelay()");
  const int port = info[0].As<Napi::Number>().Int32Value();
  int changed = 0;
  EachOpenFd([&](int fd) {
    if (TuneIfListener(fd, port)) changed++;
  });
  return Napi::Number::New(info.Env(), changed);
}

Napi::Value SetDraining(const Napi::CallbackInfo& info) {
  OWNER_ONLY(info, "setDraining()");
  State().draining.store(info[0].ToBoolean());
  return info.Env().Undefined();
}

Napi::Value GetDiag(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Addon& a = State();
  Napi::Object o = Napi::Object::New(env);
  const double created = static_cast<double>(a.created.load());
  const double deleted = static_cast<double>(a.deleted.load());
  o.Set("created", created);
  o.Set("deleted", deleted);
  o.Set("active", created - deleted);
  o.Set("deadlineExpired", static_cast<double>(a.deadline_expired.load()));
  o.Set("progressSent", static_cast<double>(a.progress_sent.load()));
  o.Set("lateAnswers", static_cast<double>(a.late_answers.load()));
  const double refused = static_cast<double>(a.drain_refused.load());
  o.Set("drainRefused", refused);
  // Sessions still being served, not counting those refused while draining.
  o.Set("serving", created - deleted - (refused - static_cast<double>(a.drain_refused_closed.load())));
  o.Set("running", a.running.load());
  o.Set("acceptingStopped", a.accepting_stopped.load());
  o.Set("wakeSignal", a.wake_signal ? "SIGRTMIN+" + std::to_string(a.wake_signal - SIGRTMIN) : std::string());
  o.Set("usedSmfiMain", a.used_smfi_main);
  o.Set("macroLayout", MacroLayout());
  const int layout = MacroLayout();
  o.Set("macroGuard", PatchedLibmilter() ? "patched libmilter"
                      : layout == -2      ? "not calibrated"
                      : layout < 0        ? "off: " + MacroGuardProblem()
                                          : "layout");
  o.Set("sessionsRefused", static_cast<double>(a.sessions_refused.load()));
  o.Set("actionsFailed", static_cast<double>(a.actions_failed.load()));
  o.Set("queueWaits", static_cast<double>(a.queue_waits.load()));
  o.Set("spinUs", static_cast<double>(a.spin_ns / 1000));
  o.Set("spinHits", static_cast<double>(a.spin_hits.load()));
  o.Set("spinMisses", static_cast<double>(a.spin_misses.load()));
  o.Set("queuePeakBytes", static_cast<double>(a.queue_peak.load()));
  o.Set("threadsFailed", static_cast<double>(a.threads_failed.load()));
  {
    std::lock_guard<std::mutex> lk(a.envmu);
    o.Set("owner", a.owner == nullptr ? "none" : a.owner == Env(env) ? "this" : "other");
  }
  return o;
}

// An environment that loaded the addon is going away (process exit, worker
// end, a reloaded addon's first load). Only the owner's teardown touches
// libmilter: it answers every parked libmilter thread and delivers nothing
// more. Any other environment's teardown does nothing.
void Cleanup(void* arg) {
  Addon& a = State();
  {
    std::lock_guard<std::mutex> lk(a.envmu);
    if (a.owner != arg) return;
  }
  CloseChannel();
}

Napi::Value Constants(Napi::Env env) {
  Napi::Object o = Napi::Object::New(env);
#define C(name) o.Set(#name, Napi::Number::New(env, static_cast<double>(name)))
  C(SMFIS_CONTINUE); C(SMFIS_REJECT); C(SMFIS_DISCARD); C(SMFIS_ACCEPT); C(SMFIS_TEMPFAIL);
  C(SMFIS_NOREPLY); C(SMFIS_SKIP); C(SMFIS_ALL_OPTS);
  C(SMFIF_ADDHDRS); C(SMFIF_CHGBODY); C(SMFIF_ADDRCPT); C(SMFIF_DELRCPT); C(SMFIF_CHGHDRS);
  C(SMFIF_QUARANTINE); C(SMFIF_CHGFROM); C(SMFIF_ADDRCPT_PAR); C(SMFIF_SETSYMLIST);
  C(SMFIP_NOCONNECT); C(SMFIP_NOHELO); C(SMFIP_NOMAIL); C(SMFIP_NORCPT); C(SMFIP_NOBODY);
  C(SMFIP_NOHDRS); C(SMFIP_NOEOH); C(SMFIP_NR_HDR); C(SMFIP_NOUNKNOWN); C(SMFIP_NODATA);
  C(SMFIP_SKIP); C(SMFIP_RCPT_REJ); C(SMFIP_NR_CONN); C(SMFIP_NR_HELO); C(SMFIP_NR_MAIL);
  C(SMFIP_NR_RCPT); C(SMFIP_NR_DATA); C(SMFIP_NR_UNKN); C(SMFIP_NR_EOH); C(SMFIP_NR_BODY);
  C(SMFIP_HDR_LEADSPC);
  C(SMFIM_CONNECT); C(SMFIM_HELO); C(SMFIM_ENVFROM); C(SMFIM_ENVRCPT); C(SMFIM_DATA);
  C(SMFIM_EOM); C(SMFIM_EOH);
#undef C
  return o;
}

}  // namespace

void InitListener(Napi::Env env, Napi::Object exports) {
  exports.Set("version", Napi::Function::New(env, Version, "version"));
  exports.Set("setconn", Napi::Function::New(env, SetConn, "setconn"));
  exports.Set("settimeout", Napi::Function::New(env, SetTimeout, "settimeout"));
  exports.Set("setbacklog", Napi::Function::New(env, SetBacklog, "setbacklog"));
  exports.Set("setdbg", Napi::Function::New(env, SetDbg, "setdbg"));
  exports.Set("opensocket", Napi::Function::New(env, OpenSocket, "opensocket"));
  exports.Set("register", Napi::Function::New(env, Register, "register"));
  exports.Set("main", Napi::Function::New(env, Main, "main"));
  exports.Set("stop", Napi::Function::New(env, Stop, "stop"));
  exports.Set("nodelay", Napi::Function::New(env, NoDelay, "nodelay"));
  exports.Set("setDraining", Napi::Function::New(env, SetDraining, "setDraining"));
  exports.Set("stopAccepting", Napi::Function::New(env, StopAccepting, "stopAccepting"));
  exports.Set("wake", Napi::Function::New(env, Wake, "wake"));
  exports.Set("getdiag", Napi::Function::New(env, GetDiag, "getdiag"));
  exports.Set("constants", Constants(env));
  exports.Set("hasListener", Napi::Boolean::New(env, mi_listener != nullptr));
  // One EnvData per load (each load of the addon has its own napi_env), never
  // freed: its address identifies the owner for the process's life.
  EnvData* d = Env(env);
  if (d == nullptr) {
    d = new EnvData{env};
    napi_set_instance_data(env, d, nullptr, nullptr);
    napi_add_env_cleanup_hook(env, Cleanup, d);
  }
}

}  // namespace nodemilter
