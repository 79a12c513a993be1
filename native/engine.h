// The state shared by the native files: one Addon per process (libmilter
// itself is process-global), one Conn per milter session, the Event records
// that carry a libmilter callback to the JavaScript thread, and the Action
// records that carry a modification back to the session's worker.
//
// Ownership across environments (main thread, worker threads, a second
// load of the addon after require.cache was cleared): the Addon is process
// state, allocated once and never destroyed, so nothing in it runs a
// destructor at exit() while libmilter threads still serve. The environment
// that first configures libmilter (setconn, register, openChannel) becomes
// its owner; only the owner may configure or run it, and only the owner's
// cleanup hook tears the channel down. Every other environment may read
// (getversion, getdiag) and nothing it does reaches the milter.
#pragma once

#include <napi.h>

#include <pthread.h>
#include <sys/types.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include <libmilter/mfapi.h>

namespace nodemilter {

// Event types, in the order of the callbacks; the numbers are shared with
// src/native.ts (EventType) and must not change without it.
enum EventType : uint8_t {
  EV_NEGOTIATE = 0,
  EV_CONNECT,
  EV_HELO,
  EV_ENVFROM,
  EV_ENVRCPT,
  EV_DATA,
  EV_HEADER,
  EV_EOH,
  EV_BODY,
  EV_EOM,
  EV_ABORT,
  EV_CLOSE,
  EV_UNKNOWN,
  EV_COUNT,
  // Not libmilter callbacks: the listener has returned; a session's worker
  // could not write the actions JavaScript recorded.
  EV_STOPPED = 100,
  EV_ACTION_FAILED = 101,
  EV_WARNING = 102,  // something JavaScript's logger must hear about, once
};

inline uint32_t Bit(int ev) { return 1u << ev; }

struct Conn;

// One libmilter callback (or a lifecycle notice) on its way to JavaScript.
// Everything libmilter handed us is copied in here before the callback
// returns: libmilter frees or reuses its buffers right after.
struct Event {
  uint8_t type = 0;
  bool first = false;      // first event of this connection seen by JS: holds a Conn ref
  uint32_t seq = 0;        // > 0 when a libmilter thread waits for the answer
  Conn* conn = nullptr;
  uint64_t conn_id = 0;
  uint64_t n0 = 0, n1 = 0;  // negotiate offer, connect family/port
  std::vector<std::string> strs;
  std::vector<std::string> macros;  // name, value... captured for no-reply events
  char* body = nullptr;     // body chunk, owned until handed to a Buffer
  size_t body_len = 0;
  size_t bytes = 0;         // counted against the queue bound while queued (0: not counted)
  std::string error;        // EV_STOPPED: why the listener returned

  ~Event() { free(body); }
};

// A modification JavaScript recorded during eom, written by the session's
// own worker (never by the JavaScript thread: libmilter's writes block).
enum ActionType : uint8_t {
  ACT_ADDHEADER,
  ACT_INSHEADER,
  ACT_CHGHEADER,
  ACT_DELHEADER,  // chgheader with no value
  ACT_ADDRCPT,
  ACT_ADDRCPT_PAR,
  ACT_DELRCPT,
  ACT_REPLACEBODY,
  ACT_CHGFROM,
  ACT_CHGFROM_PAR,
  ACT_QUARANTINE,
  ACT_PROGRESS,
};

struct Action {
  ActionType type;
  int index = 0;
  std::string a, b;  // name/value, rcpt/params, body bytes, reason
};

// One milter session. Owned jointly by libmilter (from the first callback
// until xxfi_close) and by JavaScript (from the first event it receives
// until the External wrapping it is collected): `refs` counts the owners.
// Every field below `mu` is read and written under it, except `refs`.
struct Conn {
  std::mutex mu;
  std::condition_variable cv;
  SMFICTX* ctx = nullptr;  // null once libmilter has closed the session
  uint64_t id = 0;
  std::atomic<int> refs{1};
  bool js_attached = false;  // only the session's own worker touches it

  // The callback a libmilter thread is parked in, waiting for JavaScript.
  bool waiting = false;
  uint8_t waiting_type = 0;
  uint32_t seq = 0;
  bool answered = false;
  // Set with `answered`, read without the lock by a worker spinning for its
  // answer (see Addon::spin_ns).
  std::atomic<bool> answered_hint{false};
  int status = SMFIS_CONTINUE;
  uint32_t neg_actions = 0, neg_steps = 0;  // negotiate answer from JS
  std::vector<Action> pending;              // recorded, not yet written
  bool flush_now = false;                   // a progress asks the worker to write at once

  // What negotiation settled for this session.
  uint32_t actions = 0;
  uint32_t steps = 0;
  bool negotiated = false;

  // Set once at negotiate by the session's worker.
  enum Refusal : uint8_t { NONE, DRAINING, OVER_CAP } refused = NONE;
  bool counted = false;  // counted in Addon::sessions_live

  // Bytes of this session's no-reply events still in the queue (under Addon::qmu).
  size_t queued_bytes = 0;

  // Registry of live sessions, so shutdown can wake every parked thread.
  Conn* prev = nullptr;
  Conn* next = nullptr;
};

void ConnUnref(Conn* c);

// Settings fixed at register().
struct Registration {
  std::string name;
  bool registered = false;
  int64_t actions = -1;      // -1: whatever the MTA offers
  int64_t steps = -1;        // -1: derived from the handled events
  uint32_t handled = 0;      // Bit(EV_*) for events JS has a callback for
  uint32_t noreply = 0;      // Bit(EV_*) for events JS answers without the MTA waiting
  bool dynamic_negotiate = false;
  std::string symlists[7];   // per SMFIM_* stage, space separated; empty: none
  int64_t deadline_ms[EV_COUNT] = {};
  int64_t progress_ms = 4000;
  int fallback_status = SMFIS_TEMPFAIL;
  std::vector<std::string> watch;  // macros captured with no-reply events
  int64_t max_sessions = 1000;     // sessions served at once; 0: no cap
  bool cap_closes = false;         // over the cap: close (true) or TEMPFAIL at connect (false)
};

// The bound on events queued for JavaScript that no worker waits for
// (no-reply header and body chunks above all): past either mark the worker
// that queues waits until JavaScript has taken events off the queue.
constexpr size_t kQueueHighWater = 16u << 20;        // all sessions together
constexpr size_t kSessionQueueHighWater = 2u << 20;  // one session

// What negotiation settled, per libmilter context: see RememberNegotiation.
struct Negotiated {
  uint32_t actions, steps;
};

// Everything the addon knows, in one place. Allocated once and never freed:
// libmilter's threads may outlive the JavaScript environment at exit.
struct Addon {
  Registration reg;
  struct smfiDesc desc;  // handed to smfi_register; filled at register()
  std::string conn_spec;
  int timeout = 7210;
  int backlog = 0;  // 0: libmilter's default
  int dbg = 0;
  bool conn_set = false;
  bool socket_opened = false;
  bool allow_smfi_main = false;

  // The environment that owns libmilter (see the top of this file).
  std::mutex envmu;
  void* owner = nullptr;  // that environment's EnvData

  // Lifecycle.
  std::atomic<bool> started{false};
  std::atomic<bool> running{false};
  std::atomic<bool> stop_requested{false};
  std::atomic<bool> draining{false};
  std::atomic<bool> closing{false};  // the owner environment is going away
  bool used_smfi_main = false;

  // Stop accepting (listener.cc StopAccepting): libmilter's listening
  // descriptor, found when the socket opens, and the signal that wakes the
  // listener's poll (0: none installed).
  int listen_fd = -1;
  dev_t listen_dev = 0;
  ino_t listen_ino = 0;
  std::atomic<bool> accepting_stopped{false};
  int wake_signal = 0;
  std::mutex lmu;  // guards listener_live and listener_thread
  bool listener_live = false;
  pthread_t listener_thread{};

  // The queue of events for JavaScript, and the wake-up for it.
  std::mutex qmu;
  std::condition_variable qcv;  // queue bytes went below the marks
  std::vector<Event*> queue;
  size_t queued_bytes = 0;
  bool wake_pending = false;
  bool tsfn_live = false;
  // JavaScript thread only. While CallJs delivers a round of events, the
  // workers answered meanwhile are not woken one by one: each wake-up is a
  // futex call, and on a busy machine the woken worker takes the core from
  // the JavaScript thread in the middle of the round. They are woken
  // together when the round ends (WakeAnswered). Each holds a Conn ref.
  bool delivering = false;
  std::vector<Conn*> answered_in_round;
  napi_threadsafe_function tsfn = nullptr;

  // Sessions.
  std::mutex cmu;
  Conn* conns = nullptr;
  std::atomic<uint64_t> next_conn_id{1};
  std::atomic<int64_t> sessions_live{0};
  std::atomic<uint64_t> created{0};
  std::atomic<uint64_t> deleted{0};
  std::atomic<uint64_t> deadline_expired{0};
  std::atomic<uint64_t> progress_sent{0};
  std::atomic<uint64_t> late_answers{0};
  std::atomic<uint64_t> drain_refused{0};
  std::atomic<uint64_t> drain_refused_closed{0};
  std::atomic<uint64_t> sessions_refused{0};
  std::atomic<uint64_t> sessions_refused_closed{0};
  std::atomic<uint64_t> actions_failed{0};
  std::atomic<uint64_t> queue_waits{0};
  std::atomic<uint64_t> threads_failed{0};
  std::atomic<uint64_t> queue_peak{0};

  // A worker that is the only one waiting for JavaScript spins for its
  // answer up to spin_ns before it sleeps on its condition variable: at low
  // concurrency the answer mostly comes within microseconds, and a futex
  // sleep and wake-up costs more than that. With other workers waiting
  // (JavaScript is busy), with as many sessions open as CPUs, or on one
  // CPU, nobody spins. 0: never (set at register(), from its spinUs:
  // NODEMILTER_SPIN_US).
  int64_t spin_ns = 0;
  uint64_t spin_below_sessions = 2;  // the CPU count
  std::atomic<int> waiting_workers{0};
  std::atomic<uint64_t> spin_hits{0};
  std::atomic<uint64_t> spin_misses{0};

  std::mutex negmu;
  std::unordered_map<SMFICTX*, Negotiated> negotiated;
};

Addon& State();

// Per-environment data: the identity of one environment that loaded the addon.
struct EnvData {
  napi_env env;
};
EnvData* Env(Napi::Env env);
// Throws (and returns false) unless `env` owns libmilter; claims it if nobody does.
bool ClaimOwner(Napi::Env env, const char* what);

// Starts a detached thread with every asynchronous signal blocked (see
// listener.cc); false when the system refused to create it.
bool StartThread(void* (*fn)(void*), void* arg);

// dispatch.cc: libmilter's callbacks, parking a worker, reply().
const struct smfiDesc& Callbacks();
void WakeAllParked(int status);
void InitDispatch(Napi::Env env, Napi::Object exports);

// channel.cc: the queue of events and the thread-safe function.
// Queues an event for JavaScript; false (and the event freed) when nobody
// will deliver it (after stop, or while the owner environment goes away).
bool Enqueue(Event* ev);
// The owner environment is going away.
void CloseChannel();
void InitChannel(Napi::Env env, Napi::Object exports);

// marshal.cc: an event into one call of the JavaScript handler.
void DeliverOne(napi_env env, napi_value fn, Event* ev);

// guard.cc: the libmilter layout guard.
// Whether smfi_getsymval can be called safely on this context now.
bool MacrosSafe(SMFICTX* ctx);
// Stages found in libmilter's context for MacrosSafe; -2 not yet known, -1 unknown layout.
int MacroLayout();
// True when libmilter is built with native/libmilter/odd-macros.patch (its marker mi_macros_paired is
// defined): its macro lists are always name/value pairs and MacrosSafe needs no layout.
bool PatchedLibmilter();
// Why the guard is off (empty while it is on or not yet calibrated).
std::string MacroGuardProblem();

// listener.cc
void InitListener(Napi::Env env, Napi::Object exports);

// crash.cc: the crash report for fatal signals (installed once per process).
enum ThreadRole : uint8_t { THREAD_UNKNOWN, THREAD_JS, THREAD_LISTENER, THREAD_LIBMILTER, THREAD_ADDON };
// Names the calling thread's role in a crash report and gives it an
// alternate signal stack (freed when the thread exits).
void PrepareThreadForCrash(ThreadRole role);
// The same for a libmilter thread, once: cheap enough for every callback.
void NoteLibmilterThread();
void InitCrash(Napi::Env env, Napi::Object exports);

// context.cc
void InitContext(Napi::Env env, Napi::Object exports);
Conn* UnwrapConn(Napi::Env env, const Napi::Value& v);
Napi::Value WrapConn(Napi::Env env, Conn* c);
// Writes the recorded actions on the session's worker; the first failure
// stops the rest and is reported to JavaScript.
bool WriteActions(Conn* c, SMFICTX* ctx, uint32_t seq, std::vector<Action>& actions);
// marshal.cc: ASCII as a string, anything else as a Buffer of its bytes.
Napi::Value Text(Napi::Env env, const char* s, size_t len);
inline Napi::Value Text(Napi::Env env, const std::string& s) { return Text(env, s.data(), s.size()); }

}  // namespace nodemilter
