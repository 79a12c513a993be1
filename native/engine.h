// The state shared by the native files: one Addon per process (libmilter
// itself is process-global), one Conn per milter session, and the Event
// records that carry a libmilter callback to the JavaScript thread.
#pragma once

#include <napi.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
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
  // Not a libmilter callback: the listener has returned.
  EV_STOPPED = 100,
};

inline uint32_t Bit(int ev) { return 1u << ev; }

struct Conn;

// One libmilter callback (or a lifecycle notice) on its way to JavaScript.
// Everything libmilter handed us is copied in here before the callback
// returns: libmilter frees or reuses its buffers right after.
struct Event {
  uint8_t type = 0;
  bool first = false;      // first event of this connection seen by JS
  uint32_t seq = 0;        // > 0 when a libmilter thread waits for the answer
  Conn* conn = nullptr;
  uint64_t conn_id = 0;
  uint64_t n0 = 0, n1 = 0;  // negotiate offer, connect family/port
  std::vector<std::string> strs;
  std::vector<std::string> macros;  // name, value... captured for no-reply events
  char* body = nullptr;     // body chunk, owned until handed to a Buffer
  size_t body_len = 0;
  std::string error;        // EV_STOPPED: why the listener returned

  ~Event() { free(body); }
};

// One milter session. Owned jointly by libmilter (from the first callback
// until xxfi_close) and by JavaScript (from the first event it receives
// until the External wrapping it is collected): `refs` counts the owners.
struct Conn {
  std::mutex mu;
  std::condition_variable cv;
  SMFICTX* ctx = nullptr;  // null once libmilter has closed the session
  uint64_t id = 0;
  std::atomic<int> refs{1};
  bool js_attached = false;

  // The callback a libmilter thread is parked in, waiting for JavaScript.
  bool waiting = false;
  uint8_t waiting_type = 0;
  uint32_t seq = 0;
  bool answered = false;
  int status = SMFIS_CONTINUE;
  uint32_t neg_actions = 0, neg_steps = 0;  // negotiate answer from JS

  // What negotiation settled for this session.
  uint32_t actions = 0;
  uint32_t steps = 0;
  bool negotiated = false;
  bool refused_for_drain = false;

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
};

// Everything the addon knows, in one place. Allocated once and never freed:
// libmilter's threads may outlive the JavaScript environment at exit.
struct Addon {
  Registration reg;
  std::string conn_spec;
  int timeout = 7210;
  int backlog = 0;  // 0: libmilter's default
  int dbg = 0;
  bool conn_set = false;

  // Lifecycle.
  std::atomic<bool> started{false};
  std::atomic<bool> running{false};
  std::atomic<bool> stop_requested{false};
  std::atomic<bool> draining{false};
  std::atomic<bool> closing{false};  // JS environment is going away
  bool used_smfi_main = false;

  // The queue of events for JavaScript, and the wake-up for it.
  std::mutex qmu;
  std::vector<Event*> queue;
  bool wake_pending = false;
  bool tsfn_live = false;

  // Sessions.
  std::mutex cmu;
  Conn* conns = nullptr;
  std::atomic<uint64_t> next_conn_id{1};
  std::atomic<uint64_t> created{0};
  std::atomic<uint64_t> deleted{0};
  std::atomic<uint64_t> deadline_expired{0};
  std::atomic<uint64_t> progress_sent{0};
  std::atomic<uint64_t> late_answers{0};
  std::atomic<uint64_t> drain_refused{0};
  std::atomic<uint64_t> drain_refused_closed{0};
};

Addon& State();

// dispatch.cc
extern struct smfiDesc kDesc;
void Enqueue(Event* ev);
// Whether smfi_getsymval can be called safely on this context now.
bool MacrosSafe(SMFICTX* ctx);
// Stages found in libmilter's context for MacrosSafe; -2 not yet known, -1 unknown layout.
int MacroLayout();
void WakeAllParked(int status);
void InitDispatch(Napi::Env env, Napi::Object exports);

// listener.cc
void InitListener(Napi::Env env, Napi::Object exports);

// context.cc
void InitContext(Napi::Env env, Napi::Object exports);
Conn* UnwrapConn(const Napi::Value& v);

}  // namespace nodemilter
