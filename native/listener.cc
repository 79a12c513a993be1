// Running libmilter: configuration, the listener thread, stop and drain.
//
// The listener runs on a std::thread of its own, not on an AsyncWorker: the
// libuv pool has four threads shared with fs and dns, and the listener holds
// its thread for the milter's whole life. The thread blocks every signal
// before entering libmilter, and libmilter's worker threads inherit that
// mask, so no signal meant for Node is ever taken by them. We call Debian's
// exported mi_listener() directly, which serves without smfi_main's signal
// thread (that thread sigwait()s SIGHUP/SIGTERM/SIGINT and would steal them
// from Node); if the symbol is missing we fall back to smfi_main() from the
// same fully blocked thread and report a return nobody asked for.

#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <dirent.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>

#include "engine.h"

namespace nodemilter {

Addon& State() {
  // Never destroyed: libmilter threads may still run while the process exits.
  static Addon* addon = new Addon();
  return *addon;
}

namespace {

using ListenerFn = int (*)(char*, int, smfiDesc_ptr, time_t, int);

Napi::Value Throw(Napi::Env env, const std::string& msg) {
  Napi::Error::New(env, msg).ThrowAsJavaScriptException();
  return env.Undefined();
}

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
  Addon& a = State();
  std::string spec = info[0].As<Napi::String>().Utf8Value();
  if (smfi_setconn(const_cast<char*>(spec.c_str())) != MI_SUCCESS) return Throw(info.Env(), "smfi_setconn failed");
  a.conn_spec = spec;
  a.conn_set = true;
  return info.Env().Undefined();
}

Napi::Value SetTimeout(const Napi::CallbackInfo& info) {
  const int t = info[0].As<Napi::Number>().Int32Value();
  State().timeout = t;
  smfi_settimeout(t);
  return info.Env().Undefined();
}

Napi::Value SetBacklog(const Napi::CallbackInfo& info) {
  const int b = info[0].As<Napi::Number>().Int32Value();
  if (smfi_setbacklog(b) != MI_SUCCESS) return Throw(info.Env(), "smfi_setbacklog failed");
  State().backlog = b;
  return info.Env().Undefined();
}

Napi::Value SetDbg(const Napi::CallbackInfo& info) {
  const int d = info[0].As<Napi::Number>().Int32Value();
  State().dbg = d;
  smfi_setdbg(d);
  return info.Env().Undefined();
}

Napi::Value OpenSocket(const Napi::CallbackInfo& info) {
  const bool rm = info[0].ToBoolean();
  errno = 0;
  if (smfi_opensocket(rm) != MI_SUCCESS) {
    const int e = errno;
    return Throw(info.Env(), std::string("could not open the milter socket") + (e ? std::string(": ") + strerror(e) : ""));
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

}  // namespace

void SetWatchList(std::vector<std::string> names);

namespace {

// register({name, actions, steps, handled, noreply, dynamicNegotiate,
//           symlists[7], deadlines[EV_COUNT], progressMs, fallbackStatus, watch[]})
Napi::Value Register(const Napi::CallbackInfo& info) {
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
  SetWatchList(StringArray(o.Get("watch")));

  kDesc.xxfi_name = const_cast<char*>(r.name.c_str());
  kDesc.xxfi_flags = r.actions < 0 ? (SMFIF_ADDHDRS | SMFIF_CHGBODY | SMFIF_ADDRCPT | SMFIF_DELRCPT | SMFIF_CHGHDRS |
                                      SMFIF_QUARANTINE | SMFIF_CHGFROM | SMFIF_ADDRCPT_PAR | SMFIF_SETSYMLIST)
                                   : static_cast<unsigned long>(r.actions);
  if (smfi_register(kDesc) != MI_SUCCESS) return Throw(env, "smfi_register failed");
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

void ListenerThread() {
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, nullptr);
  Addon& a = State();
  auto listener = reinterpret_cast<ListenerFn>(dlsym(RTLD_DEFAULT, "mi_listener"));
  int rc;
  if (listener) {
    rc = listener(const_cast<char*>(a.conn_spec.c_str()), a.dbg, &kDesc, a.timeout,
                  a.backlog > 0 ? a.backlog : SOMAXCONN);
  } else {
    a.used_smfi_main = true;
    rc = smfi_main();
  }
  NotifyStopped(rc, !listener);
}

// main(): start serving; the returned promise lives in TypeScript.
Napi::Value Main(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Addon& a = State();
  if (a.started.load()) return Throw(env, "main() was already called: libmilter runs once per process");
  if (!a.reg.registered) return Throw(env, "register() must be called before main()");
  if (!a.conn_set) return Throw(env, "setconn() must be called before main()");
  {
    std::lock_guard<std::mutex> lk(a.qmu);
    if (!a.tsfn_live) return Throw(env, "event channel is not open");
  }
  a.started.store(true);
  a.running.store(true);
  std::thread(ListenerThread).detach();
  return env.Undefined();
}

// stop(): ask libmilter to stop. smfi_stop() can block for seconds, so it
// runs on a thread of its own; the listener's return is reported as an event.
Napi::Value Stop(const Napi::CallbackInfo& info) {
  Addon& a = State();
  if (!a.started.load()) return Throw(info.Env(), "stop() before main()");
  if (a.stop_requested.exchange(true)) return info.Env().Undefined();
  std::thread([] {
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, nullptr);
    smfi_stop();
  }).detach();
  return info.Env().Undefined();
}

// nodelay(port): turn Nagle's algorithm off on libmilter's listening TCP
// socket; Linux hands the setting down to every accepted connection.
// libmilter writes an end-of-message reply as several small packets (one
// per action, then the verdict); with Nagle on, the second packet waits for
// the MTA's delayed ACK, about 40 ms a message. libmilter does not expose
// its socket, so find it: the listening stream socket bound to `port`.
// Returns how many sockets were changed.
bool TuneIfListener(int fd, int port) {
  int listening = 0, type = 0;
  socklen_t len = sizeof(int);
  if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) != 0 || !listening) return false;
  len = sizeof(int);
  if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != SOCK_STREAM) return false;
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
  const int port = info[0].As<Napi::Number>().Int32Value();
  int changed = 0;
  // Only the descriptors that are open: /proc/self/fd lists them.
  if (DIR* d = opendir("/proc/self/fd")) {
    const int self = dirfd(d);
    while (dirent* e = readdir(d)) {
      if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
      const int fd = atoi(e->d_name);
      if (fd != self && TuneIfListener(fd, port)) changed++;
    }
    closedir(d);
  } else {
    for (int fd = 0; fd < 1024; fd++)
      if (TuneIfListener(fd, port)) changed++;
  }
  return Napi::Number::New(info.Env(), changed);
}

Napi::Value SetDraining(const Napi::CallbackInfo& info) {
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
  o.Set("usedSmfiMain", a.used_smfi_main);
  o.Set("macroLayout", MacroLayout());
  return o;
}

// The Node environment is going away (process exit, worker end): answer
// every parked libmilter thread and deliver nothing more.
void Cleanup(void*) {
  Addon& a = State();
  a.closing.store(true);
  {
    std::lock_guard<std::mutex> lk(a.qmu);
    a.tsfn_live = false;
  }
  WakeAllParked(a.reg.fallback_status);
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
  exports.Set("getdiag", Napi::Function::New(env, GetDiag, "getdiag"));
  exports.Set("constants", Constants(env));
  exports.Set("hasListener", Napi::Boolean::New(env, dlsym(RTLD_DEFAULT, "mi_listener") != nullptr));
  napi_add_env_cleanup_hook(env, Cleanup, nullptr);
}

}  // namespace nodemilter
