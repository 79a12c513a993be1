// Crash reports: what a fatal signal prints before the process dies of it.
//
// Why this exists. At start-up Node 20 keeps the handlers a preloaded
// library installed (it resets only an inherited SIG_IGN), but installs its
// own SIGSEGV handler over them, for V8's WebAssembly trap handler: a fault
// V8 does not recognise as a wasm trap is re-raised with the default action,
// and the handler it replaced (a preloaded sanitizer's) is never called.
// SIGBUS, SIGILL, SIGFPE and SIGABRT have no handler unless a preloaded
// library set one. A fault in libmilter or in this addon, on a libmilter
// thread or on the JavaScript thread, therefore killed the process with
// nothing on stderr but the shell's "Segmentation fault".
//
// What it does. Once per process (the first load of the addon in any
// environment; NODEMILTER_CRASH_HANDLER=0 opts out) it installs a handler
// for SIGSEGV, SIGBUS, SIGILL, SIGFPE and SIGABRT that
//   1. hands a SIGSEGV to V8 first (v8::TryHandleWebAssemblyTrapPosix, weak):
//      a wasm out-of-bounds access stays a JavaScript exception;
//   2. writes a report to stderr with write(2): the signal and its code,
//      the fault address, the instruction pointer, which thread (a
//      JavaScript thread, libmilter's listener, a libmilter worker, another
//      thread of the addon, or a thread that is none of nodemilter's), a
//      backtrace, and under a sanitizer the sanitizer's own stack;
//   3. calls the handler that was there before (Node's, for SIGSEGV: it
//      restores the terminal and re-raises; a preloaded sanitizer's for
//      SIGBUS and SIGFPE: it prints its own report and exits), then restores
//      the default action and re-raises, so the process dies of the same
//      signal: the exit status, systemd's status=11/SEGV and core dumps stay
//      as they were.
// The handler runs on an alternate signal stack on every thread the addon
// starts, on every libmilter thread that ran one of its callbacks, and on
// every JavaScript thread that loaded the addon and had none (Node sets
// none), so a stack overflow there is reported too. A thread that already
// has one (a sanitizer's) keeps it.
//
// Async-signal safety. The handler formats numbers itself and writes with
// write(2). backtrace() is not async-signal-safe on its first call (glibc
// loads libgcc_s with malloc then), so it is called once at install;
// backtrace_symbols_fd() does not allocate but takes the dynamic loader's
// lock in dladdr(), so a fault inside the loader may hang the report: the
// other faulting threads wait at most kReportWaitMs for it. The sanitizer's
// stack printer is not async-signal-safe either; it is what the sanitizer
// itself would have run at this point.
//
// A handler installed after the addon loaded sees faults first, and runs
// ours only if it chains. A handler that was there before and recovers from
// a fault (returns so the instruction runs again) will not get the chance:
// ours reports and re-raises after it returns; V8's wasm traps are the one
// recovery Node needs, and they are handled before the report.

#include <dlfcn.h>
#if __has_include(<execinfo.h>)
#include <execinfo.h>
#define NODEMILTER_HAVE_BACKTRACE 1
#endif
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "engine.h"

// Present under AddressSanitizer (and the other sanitizers): prints the
// calling thread's stack the way the sanitizer's own reports do.
extern "C" void __sanitizer_print_stack_trace() __attribute__((weak));

// V8's public hook for embedders that own SIGSEGV (v8-wasm-trap-handler-posix.h);
// Node exports it. Weak, so that a runtime without it still loads the addon.
namespace v8 {
bool TryHandleWebAssemblyTrapPosix(int sig_code, siginfo_t* info, void* context) __attribute__((weak));
}

// The handler, under a name dladdr() can see: a second copy of the addon in
// the same process (another path) finds it installed and leaves it alone.
extern "C" __attribute__((visibility("default"))) void nodemilter_fatal_signal(int sig, siginfo_t* info, void* uc);

namespace nodemilter {

namespace {

constexpr int kFatalSignals[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT};
constexpr size_t kMinAltStack = 64 * 1024;
constexpr int kReportWaitMs = 5000;
constexpr const char* kHandlerSymbol = "nodemilter_fatal_signal";

enum State : int { NOT_INSTALLED, INSTALLED, OPTED_OUT, OTHER_COPY, FAILED };

std::atomic<int> g_state{NOT_INSTALLED};
std::atomic<bool> g_install_started{false};
std::atomic<uint64_t> g_wasm_traps{0};
std::atomic<long> g_reporter{0};  // thread id of the thread writing a report
int g_install_errno = 0;
struct sigaction g_prev[NSIG];  // written before the handler is installed, read-only after
pthread_key_t g_stack_key;
size_t g_stack_size = 0, g_page = 4096;

// Read in the handler. glibc allocates a dlopen'ed module's dynamic TLS on
// a thread's first access (malloc); initial-exec TLS is one load from the
// thread pointer. musl allocates all TLS up front, and refuses initial-exec
// TLS in a dlopen'ed module, so it keeps the default model.
#if defined(__GLIBC__)
__thread uint8_t t_role __attribute__((tls_model("initial-exec"))) = THREAD_UNKNOWN;
#else
__thread uint8_t t_role = THREAD_UNKNOWN;
#endif

// A line assembled on the stack and written with one write(2).
class Out {
 public:
  Out& S(const char* s) {
    while (*s && n_ < sizeof(buf_)) buf_[n_++] = *s++;
    return *this;
  }
  Out& Dec(long v) {
    char tmp[24];
    int i = 0;
    bool neg = v < 0;
    unsigned long u = neg ? 0ul - static_cast<unsigned long>(v) : static_cast<unsigned long>(v);
    do tmp[i++] = static_cast<char>('0' + u % 10); while ((u /= 10) != 0);
    if (neg) tmp[i++] = '-';
    while (i > 0 && n_ < sizeof(buf_)) buf_[n_++] = tmp[--i];
    return *this;
  }
  Out& Hex(uintptr_t v) {
    S("0x");
    for (int shift = static_cast<int>(sizeof(v) * 8) - 4; shift >= 0; shift -= 4)
      if (n_ < sizeof(buf_)) buf_[n_++] = "0123456789abcdef"[(v >> shift) & 0xf];
    return *this;
  }
  void Flush() {
    if (n_ < sizeof(buf_)) buf_[n_++] = '\n';
    size_t off = 0;
    while (off < n_) {
      ssize_t w = write(STDERR_FILENO, buf_ + off, n_ - off);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) break;
      off += static_cast<size_t>(w);
    }
    n_ = 0;
  }

 private:
  char buf_[512];
  size_t n_ = 0;
};

const char* SignalName(int sig) {
  switch (sig) {
    case SIGSEGV: return "SIGSEGV";
    case SIGBUS: return "SIGBUS";
    case SIGILL: return "SIGILL";
    case SIGFPE: return "SIGFPE";
    case SIGABRT: return "SIGABRT";
    default: return "signal";
  }
}

const char* CodeName(int sig, int code) {
  switch (code) {
    case SI_USER: return "sent by kill()";
    case SI_TKILL: return "sent by tgkill() (raise, abort, pthread_kill)";
    case SI_QUEUE: return "sent by sigqueue()";
    default: break;
  }
  if (sig == SIGSEGV) {
    if (code == SEGV_MAPERR) return "address not mapped";
    if (code == SEGV_ACCERR) return "invalid permissions for the mapping";
  } else if (sig == SIGBUS) {
    if (code == BUS_ADRALN) return "misaligned address";
    if (code == BUS_ADRERR) return "nonexistent physical address (a mapping past the end of its file?)";
    if (code == BUS_OBJERR) return "object-specific hardware error";
  } else if (sig == SIGILL) {
    if (code == ILL_ILLOPC) return "illegal opcode";
    if (code == ILL_ILLOPN) return "illegal operand";
    if (code == ILL_PRVOPC) return "privileged opcode";
  } else if (sig == SIGFPE) {
    if (code == FPE_INTDIV) return "integer divide by zero";
    if (code == FPE_INTOVF) return "integer overflow";
    if (code == FPE_FLTDIV) return "floating-point divide by zero";
  }
  return "code";
}

uintptr_t InstructionPointer(void* uc) {
  if (uc == nullptr) return 0;
  const ucontext_t* u = static_cast<const ucontext_t*>(uc);
#if defined(__x86_64__)
  return static_cast<uintptr_t>(u->uc_mcontext.gregs[REG_RIP]);
#elif defined(__aarch64__)
  return static_cast<uintptr_t>(u->uc_mcontext.pc);
#elif defined(__i386__)
  return static_cast<uintptr_t>(u->uc_mcontext.gregs[REG_EIP]);
#else
  (void)u;
  return 0;
#endif
}

const char* RoleName(uint8_t role, const char* thread_name) {
  switch (role) {
    case THREAD_JS: return "a JavaScript thread (Node's main thread or a worker_threads Worker that loaded the addon)";
    case THREAD_LISTENER: return "libmilter's listener thread (started by the nodemilter addon)";
    case THREAD_LIBMILTER: return "a libmilter worker thread (it ran the nodemilter addon's callbacks)";
    case THREAD_ADDON: return "a thread the nodemilter addon started";
    default: break;
  }
  // libmilter's threads carry the listener's name before any callback runs on them.
  if (strcmp(thread_name, "nodemilter") == 0) return "a libmilter thread (no addon callback had run on it yet)";
  return "a thread that is not one of nodemilter's";
}

void SleepMs(long ms) {
  struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
  }
}

// Whether a handler (not SIG_DFL or SIG_IGN) was installed for `sig` before ours.
bool HasPrevious(int sig) {
  const struct sigaction& prev = g_prev[sig];
  if (prev.sa_flags & SA_SIGINFO) return prev.sa_sigaction != nullptr;
  return prev.sa_handler != SIG_DFL && prev.sa_handler != SIG_IGN && prev.sa_handler != nullptr;
}

void Report(int sig, siginfo_t* info, void* uc) {
  const long tid = syscall(SYS_gettid);
  char name[17] = {0};
  prctl(PR_GET_NAME, name, 0, 0, 0);
  Out o;
  o.Flush();
  o.S("==== nodemilter crash report: fatal signal ").S(SignalName(sig))
      .S(" (written by nodemilter's native addon; the thread and backtrace say where it happened) ====").Flush();
  o.S("nodemilter: signal ").Dec(sig).S(" ").S(SignalName(sig)).S(", ");
  const int code = info ? info->si_code : 0;
  o.S(CodeName(sig, code)).S(" (si_code ").Dec(code).S(")");
  if (info && code > 0) o.S(", fault address ").Hex(reinterpret_cast<uintptr_t>(info->si_addr));
  else if (info) o.S(", from pid ").Dec(static_cast<long>(info->si_pid));
  o.Flush();
  o.S("nodemilter: instruction pointer ").Hex(InstructionPointer(uc)).S(", pid ").Dec(static_cast<long>(getpid())).Flush();
  o.S("nodemilter: thread ").Dec(tid).S(" \"").S(name).S("\": ").S(RoleName(t_role, name)).Flush();
  if (sig == SIGABRT)
    o.S("nodemilter: SIGABRT comes from abort(): what was printed just before (Node's FATAL ERROR, a failed assertion) says why").Flush();
  o.S("nodemilter: backtrace (module(symbol+offset)[address]; resolve with addr2line -f -e MODULE OFFSET):").Flush();
#ifdef NODEMILTER_HAVE_BACKTRACE
  void* frames[64];
  const int n = backtrace(frames, 64);
  // Start at the faulting instruction: the frames before it are this
  // handler's and the kernel's signal trampoline.
  const uintptr_t ip = InstructionPointer(uc);
  int first = 0;
  for (int i = 0; i < n && ip != 0; i++)
    if (reinterpret_cast<uintptr_t>(frames[i]) == ip) {
      first = i;
      break;
    }
  backtrace_symbols_fd(frames + first, n - first, STDERR_FILENO);
#else
  o.S("nodemilter: (no backtrace(): this C library has no execinfo.h)").Flush();
#endif
  if (__sanitizer_print_stack_trace) {
    o.S("nodemilter: the sanitizer's stack of this thread:").Flush();
    __sanitizer_print_stack_trace();
  }
  if (HasPrevious(sig))
    o.S("nodemilter: next, the ").S(SignalName(sig)).S(" handler that was there before this one (it may report and exit its own way), then");
  else
    o.S("nodemilter: the process now dies of ").S(SignalName(sig)).S(" with");
  o.S(" the default action (exit status 128+").Dec(sig)
      .S(" in a shell, a core dump where enabled); NODEMILTER_CRASH_HANDLER=0 turns this report off").Flush();
  o.S("==== end of nodemilter crash report ====").Flush();
}

void Chain(int sig, siginfo_t* info, void* uc) {
  if (!HasPrevious(sig)) return;
  const struct sigaction& prev = g_prev[sig];
  if (prev.sa_flags & SA_SIGINFO) prev.sa_sigaction(sig, info, uc);
  else prev.sa_handler(sig);
}

void FreeAltStack(void* mem) {
  stack_t off;
  memset(&off, 0, sizeof(off));
  off.ss_flags = SS_DISABLE;
  sigaltstack(&off, nullptr);
  munmap(mem, g_stack_size + g_page);
}

const char* StateText(int s) {
  switch (s) {
    case NOT_INSTALLED: return "not installed";
    case INSTALLED: return "installed";
    case OPTED_OUT: return "off: NODEMILTER_CRASH_HANDLER=0";
    case OTHER_COPY: return "installed by another copy of the addon in this process";
    default: return "failed";
  }
}

bool OptedOut() {
  const char* v = getenv("NODEMILTER_CRASH_HANDLER");
  return v != nullptr && (strcmp(v, "0") == 0 || strcmp(v, "off") == 0 || strcmp(v, "false") == 0 || strcmp(v, "no") == 0);
}

// Whether the SIGSEGV handler in place is this function of another copy of the addon.
bool OtherCopyInstalled() {
  struct sigaction cur;
  if (sigaction(SIGSEGV, nullptr, &cur) != 0 || !(cur.sa_flags & SA_SIGINFO)) return false;
  void* fn = reinterpret_cast<void*>(cur.sa_sigaction);
  if (fn == reinterpret_cast<void*>(&nodemilter_fatal_signal)) return false;
  Dl_info dl;
  return dladdr(fn, &dl) != 0 && dl.dli_sname != nullptr && strcmp(dl.dli_sname, kHandlerSymbol) == 0 &&
         dl.dli_saddr == fn;
}

void Install() {
  if (g_install_started.exchange(true)) return;
  if (OptedOut()) {
    g_state.store(OPTED_OUT);
    return;
  }
  if (OtherCopyInstalled()) {
    g_state.store(OTHER_COPY);
    return;
  }
  // The first backtrace() loads libgcc_s (malloc, the loader's lock): do it
  // now, not in the handler.
#ifdef NODEMILTER_HAVE_BACKTRACE
  void* warm[2];
  backtrace(warm, 2);
#endif
  g_page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const long min = sysconf(_SC_SIGSTKSZ);
  g_stack_size = kMinAltStack;
  if (min > 0 && static_cast<size_t>(min) * 4 > g_stack_size) g_stack_size = static_cast<size_t>(min) * 4;
  g_stack_size = (g_stack_size + g_page - 1) / g_page * g_page;
  if (pthread_key_create(&g_stack_key, FreeAltStack) != 0) {
    g_install_errno = errno;
    g_state.store(FAILED);
    return;
  }
  struct sigaction sa;
  memset(&sa, 0, sizeof(sa));
  sa.sa_sigaction = nodemilter_fatal_signal;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  // A fault inside the handler gets the default action at once (the kernel
  // forces it for a blocked synchronous fault): no recursion.
  sigemptyset(&sa.sa_mask);
  for (int sig : kFatalSignals) sigaddset(&sa.sa_mask, sig);
  for (int sig : kFatalSignals) sigaction(sig, nullptr, &g_prev[sig]);
  for (int sig : kFatalSignals) {
    if (sigaction(sig, &sa, nullptr) != 0) {
      g_install_errno = errno;
      for (int s : kFatalSignals) sigaction(s, &g_prev[s], nullptr);
      g_state.store(FAILED);
      return;
    }
  }
  g_state.store(INSTALLED);
}

Napi::Value CrashHandlerInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  const int s = g_state.load();
  std::string state = StateText(s);
  if (s == FAILED && g_install_errno != 0) state += std::string(": ") + strerror(g_install_errno);
  // Read back, as the kernel has it now: a handler installed after ours
  // replaced it, or a sanitizer refused the change (ASan with
  // allow_user_segv_handler=0 answers success and keeps its own).
  std::string elsewhere;
  if (s == INSTALLED) {
    for (int sig : kFatalSignals) {
      struct sigaction cur;
      if (sigaction(sig, nullptr, &cur) == 0 && (cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == nodemilter_fatal_signal)
        continue;
      elsewhere += std::string(elsewhere.empty() ? "" : ", ") + SignalName(sig);
    }
  }
  if (!elsewhere.empty())
    state += "; handled elsewhere now: " + elsewhere + " (a handler installed after the addon, or a sanitizer that kept its own)";
  o.Set("state", state);
  o.Set("wasmTraps", static_cast<double>(g_wasm_traps.load()));
  o.Set("altStackBytes", static_cast<double>(s == INSTALLED ? g_stack_size : 0));
  return o;
}

}  // namespace

void PrepareThreadForCrash(ThreadRole role) {
  t_role = role;
  if (g_state.load(std::memory_order_acquire) != INSTALLED) return;
  stack_t cur;
  // One is there already: ours from an earlier call, or a sanitizer's.
  if (sigaltstack(nullptr, &cur) == 0 && !(cur.ss_flags & SS_DISABLE)) return;
  void* mem = mmap(nullptr, g_stack_size + g_page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) return;
  mprotect(mem, g_page, PROT_NONE);  // a guard page below the stack
  stack_t ss;
  memset(&ss, 0, sizeof(ss));
  ss.ss_sp = static_cast<char*>(mem) + g_page;
  ss.ss_size = g_stack_size;
  if (sigaltstack(&ss, nullptr) != 0 || pthread_setspecific(g_stack_key, mem) != 0) {
    FreeAltStack(mem);
    return;
  }
}

void NoteLibmilterThread() {
  if (t_role == THREAD_UNKNOWN) PrepareThreadForCrash(THREAD_LIBMILTER);
}

void InitCrash(Napi::Env env, Napi::Object exports) {
  Install();
  PrepareThreadForCrash(THREAD_JS);
  exports.Set("crashHandler", Napi::Function::New(env, CrashHandlerInfo, "crashHandler"));
}

}  // namespace nodemilter

extern "C" void nodemilter_fatal_signal(int sig, siginfo_t* info, void* uc) {
  using namespace nodemilter;
  const int saved_errno = errno;
  if (sig == SIGSEGV && v8::TryHandleWebAssemblyTrapPosix && v8::TryHandleWebAssemblyTrapPosix(sig, info, uc)) {
    g_wasm_traps.fetch_add(1, std::memory_order_relaxed);
    errno = saved_errno;
    return;  // V8 moved the instruction pointer to its trap landing pad
  }
  const long tid = syscall(SYS_gettid);
  long expected = 0;
  if (g_reporter.compare_exchange_strong(expected, tid)) {
    Report(sig, info, uc);
  } else {
    // Another thread is reporting and will end the process; give it time.
    for (int waited = 0; waited < kReportWaitMs; waited += 10) SleepMs(10);
  }
  Chain(sig, info, uc);
  struct sigaction dfl;
  memset(&dfl, 0, sizeof(dfl));
  dfl.sa_handler = SIG_DFL;
  sigaction(sig, &dfl, nullptr);
  // Blocked until the handler returns (sa_mask), then taken with the
  // default action; a fault would also repeat at the same instruction.
  raise(sig);
  errno = saved_errno;
}
