// libmilter's callbacks, and how each one reaches JavaScript.
//
// Every callback runs on a libmilter worker thread. It copies what libmilter
// handed it into an Event and appends it to one process-wide queue; the
// first event into an empty queue wakes the JavaScript thread through a
// thread-safe function, which then drains the whole queue in one go (many
// events per event-loop wake-up). An event the MTA needs an answer for parks
// its worker thread on the session's condition variable until JavaScript
// answers or the deadline passes; an event the MTA does not wait for
// (no-reply steps, abort, close) is queued and the worker returns at once.
// A session's callbacks never overlap, so the queue keeps each session's
// events in protocol order.

#include <cstring>
#include <chrono>
#include <unordered_map>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "engine.h"

namespace nodemilter {

namespace {

using Clock = std::chrono::steady_clock;

// SMFIP_NO* and SMFIP_NR_* bit for each event type (0: none exists).
const uint32_t kNoBit[EV_COUNT] = {
    0, SMFIP_NOCONNECT, SMFIP_NOHELO, SMFIP_NOMAIL, SMFIP_NORCPT, SMFIP_NODATA,
    SMFIP_NOHDRS, SMFIP_NOEOH, SMFIP_NOBODY, 0, 0, 0, SMFIP_NOUNKNOWN};
const uint32_t kNrBit[EV_COUNT] = {
    0, SMFIP_NR_CONN, SMFIP_NR_HELO, SMFIP_NR_MAIL, SMFIP_NR_RCPT, SMFIP_NR_DATA,
    SMFIP_NR_HDR, SMFIP_NR_EOH, SMFIP_NR_BODY, 0, 0, 0, SMFIP_NR_UNKN};

// Macros worth remembering for events JavaScript handles without a parked
// thread (getsymval cannot reach libmilter then): the symlist names plus
// the macros MTAs commonly send. Set once at register().
std::vector<std::string> g_watch;

void Register(Conn* c) {
  Addon& a = State();
  std::lock_guard<std::mutex> lk(a.cmu);
  c->next = a.conns;
  if (a.conns) a.conns->prev = c;
  a.conns = c;
}

void Unregister(Conn* c) {
  Addon& a = State();
  std::lock_guard<std::mutex> lk(a.cmu);
  if (c->prev) c->prev->next = c->next;
  else if (a.conns == c) a.conns = c->next;
  if (c->next) c->next->prev = c->prev;
  c->prev = c->next = nullptr;
}

// What negotiation settled, per libmilter context. After QUIT_NC libmilter
// closes the session and serves the next one on the same context without a
// new negotiation, so the new Conn takes its options from here. A context
// address is overwritten by the next negotiation that reuses it, so the table
// holds at most one entry per context address ever in use.
struct Negotiated {
  uint32_t actions, steps;
};
std::mutex g_negmu;
std::unordered_map<SMFICTX*, Negotiated> g_negotiated;

void RememberNegotiation(SMFICTX* ctx, uint32_t actions, uint32_t steps) {
  std::lock_guard<std::mutex> lk(g_negmu);
  g_negotiated[ctx] = {actions, steps};
}

Conn* GetConn(SMFICTX* ctx, bool negotiating = false) {
  Conn* c = static_cast<Conn*>(smfi_getpriv(ctx));
  if (c) return c;
  Addon& a = State();
  c = new Conn();
  c->ctx = ctx;
  c->id = a.next_conn_id.fetch_add(1);
  if (!negotiating) {
    std::lock_guard<std::mutex> lk(g_negmu);
    auto it = g_negotiated.find(ctx);
    if (it != g_negotiated.end()) {
      c->actions = it->second.actions;
      c->steps = it->second.steps;
      c->negotiated = true;
    }
  }
  smfi_setpriv(ctx, c);
  Register(c);
  a.created.fetch_add(1);
  return c;
}

// Takes the first-event reference for JavaScript when needed.
void Attach(Conn* c, Event* ev) {
  ev->conn = c;
  ev->conn_id = c->id;
  if (!c->js_attached) {
    c->js_attached = true;
    c->refs.fetch_add(1);
    ev->first = true;
  }
}

// smfi_getsymval walks a stage's macro list two entries at a time. A MACRO
// command with an odd number of strings (a broken or hostile MTA) makes it
// step over the list's terminating NULL and read past the allocation, which
// can crash the process. libmilter offers no way to see the lists, so find
// them: the context's private-data pointer (ours, set with smfi_setpriv)
// follows the three per-stage macro arrays and the reply pointer in
// sendmail 8.14+'s struct smfi_str (ctx_mac_ptr[N], ctx_mac_buf[N],
// ctx_mac_list[N], ctx_reply, ctx_privdata). Its offset is found once by
// scanning for our pointer; N follows from it and must be 4..8, else the
// check is off and macros are not read from libmilter at all.
std::atomic<int> g_macptr_off{-2};  // -2: not calibrated; -1: unknown layout
std::atomic<int> g_macptr_n{0};

void Calibrate(SMFICTX* ctx, const void* priv) {
  const char* base = reinterpret_cast<const char*>(ctx);
  int found = -1;
  for (int off = 0; off <= 512; off += static_cast<int>(sizeof(void*))) {
    const void* v;
    memcpy(&v, base + off, sizeof(v));
    if (v == priv) {
      found = off;
      break;
    }
  }
  // ctx_mac_ptr starts after the fixed fields (80 bytes on LP64).
  const int fixed = 80;
  const int span = found - fixed - static_cast<int>(sizeof(void*));
  const int per = 3 * static_cast<int>(sizeof(void*));
  if (found > 0 && span > 0 && span % per == 0 && span / per >= 4 && span / per <= 8) {
    g_macptr_n.store(span / per);
    g_macptr_off.store(fixed);
  } else {
    g_macptr_off.store(-1);
  }
}

}  // namespace

int MacroLayout() { return g_macptr_off.load() < 0 ? g_macptr_off.load() : g_macptr_n.load(); }

bool MacrosSafe(SMFICTX* ctx) {
  if (ctx == nullptr) return false;
  int off = g_macptr_off.load();
  if (off == -2) {
    const void* priv = smfi_getpriv(ctx);
    if (priv == nullptr) return false;
    Calibrate(ctx, priv);
    off = g_macptr_off.load();
  }
  if (off < 0) return false;
  const char* base = reinterpret_cast<const char*>(ctx) + off;
  for (int i = 0; i < g_macptr_n.load(); i++) {
    char** list;
    memcpy(&list, base + i * sizeof(char**), sizeof(list));
    if (list == nullptr) continue;
    size_t n = 0;
    while (list[n] != nullptr && n < 100000) n++;
    if (n % 2 != 0) return false;
  }
  return true;
}

namespace {

void CaptureMacros(SMFICTX* ctx, Event* ev) {
  if (!MacrosSafe(ctx)) return;
  for (const std::string& name : g_watch) {
    const char* v = smfi_getsymval(ctx, const_cast<char*>(name.c_str()));
    if (v) {
      ev->macros.push_back(name);
      ev->macros.push_back(v);
    }
  }
}

inline bool Handled(int type) { return State().reg.handled & Bit(type); }

// Queue an event the MTA does not wait for; returns the status for libmilter.
sfsistat Post(Conn* c, Event* ev) {
  Attach(c, ev);
  const uint32_t nr = kNrBit[ev->type];
  Enqueue(ev);
  return (nr && (c->steps & nr)) ? SMFIS_NOREPLY : SMFIS_CONTINUE;
}

void SetFallbackReply(SMFICTX* ctx, int status, const char* why) {
  if (status == SMFIS_TEMPFAIL) {
    smfi_setreply(ctx, const_cast<char*>("451"), const_cast<char*>("4.3.0"), const_cast<char*>(why));
  } else if (status == SMFIS_REJECT) {
    smfi_setreply(ctx, const_cast<char*>("554"), const_cast<char*>("5.3.0"), const_cast<char*>(why));
  }
}

// Queue an event and park this worker until JavaScript answers or the
// deadline passes. During EOM, send progress while waiting.
sfsistat Wait(Conn* c, Event* ev) {
  Addon& a = State();
  const int type = ev->type;
  Attach(c, ev);
  std::unique_lock<std::mutex> lk(c->mu);
  if (a.closing.load()) {
    delete ev;
    return a.reg.fallback_status;
  }
  c->seq += 1;
  if (c->seq == 0) c->seq = 1;
  ev->seq = c->seq;
  c->waiting = true;
  c->waiting_type = static_cast<uint8_t>(type);
  c->answered = false;
  Enqueue(ev);

  const int64_t deadline_ms = a.reg.deadline_ms[type] > 0 ? a.reg.deadline_ms[type] : 8000;
  const auto deadline = Clock::now() + std::chrono::milliseconds(deadline_ms);
  const bool progress = type == EV_EOM && a.reg.progress_ms > 0;
  auto next_progress = Clock::now() + std::chrono::milliseconds(a.reg.progress_ms);
  bool expired = false;
  while (!c->answered) {
    auto until = deadline;
    if (progress && next_progress < until) until = next_progress;
    c->cv.wait_until(lk, until);
    if (c->answered) break;
    const auto now = Clock::now();
    if (now >= deadline) {
      expired = true;
      break;
    }
    if (progress && now >= next_progress) {
      if (c->ctx) smfi_progress(c->ctx);
      a.progress_sent.fetch_add(1);
      next_progress = now + std::chrono::milliseconds(a.reg.progress_ms);
    }
  }
  c->waiting = false;
  if (expired) {
    a.deadline_expired.fetch_add(1);
    const int st = a.reg.fallback_status;
    SetFallbackReply(c->ctx, st, "Mail filter did not answer in time");
    return st;
  }
  return c->status;
}

sfsistat Deliver(SMFICTX* ctx, Conn* c, Event* ev) {
  const uint32_t b = Bit(ev->type);
  if (State().reg.noreply & b) {
    if (ev->type <= EV_ENVRCPT || ev->type == EV_DATA || ev->type == EV_EOH) CaptureMacros(ctx, ev);
    return Post(c, ev);
  }
  return Wait(c, ev);
}

// ---- The libmilter callbacks.

sfsistat OnNegotiate(SMFICTX* ctx, unsigned long f0, unsigned long f1, unsigned long, unsigned long,
                     unsigned long* pf0, unsigned long* pf1, unsigned long* pf2, unsigned long* pf3) {
  Addon& a = State();
  Conn* c = GetConn(ctx, true);
  const Registration& r = a.reg;
  *pf2 = 0;
  *pf3 = 0;
  const bool drain = a.draining.load();
  if (drain) {
    // Make sure connect reaches us, to refuse the session there.
    c->refused_for_drain = true;
    a.drain_refused.fetch_add(1);
    *pf0 = 0;
    *pf1 = 0;  // every step, every reply
    c->negotiated = true;
    RememberNegotiation(ctx, 0, 0);
    return SMFIS_CONTINUE;
  }
  if (r.dynamic_negotiate && (r.handled & Bit(EV_NEGOTIATE))) {
    Event* ev = new Event();
    ev->type = EV_NEGOTIATE;
    ev->n0 = f0;
    ev->n1 = f1;
    const sfsistat st = Wait(c, ev);
    if (st == SMFIS_CONTINUE) {
      c->actions = c->neg_actions & f0;
      c->steps = c->neg_steps & f1;
      *pf0 = c->actions;
      *pf1 = c->steps;
    } else if (st == SMFIS_ALL_OPTS) {
      c->actions = f0 & kDesc.xxfi_flags;
      c->steps = 0;
    }
    c->negotiated = true;
    RememberNegotiation(ctx, c->actions, c->steps);
    return st;
  }
  uint32_t actions = r.actions < 0 ? static_cast<uint32_t>(f0) : static_cast<uint32_t>(r.actions & f0);
  bool any_symlist = false;
  for (const std::string& s : r.symlists) any_symlist = any_symlist || !s.empty();
  if (any_symlist && (f0 & SMFIF_SETSYMLIST)) actions |= SMFIF_SETSYMLIST;
  uint32_t want;
  if (r.steps >= 0) {
    want = static_cast<uint32_t>(r.steps);
  } else {
    want = 0;
    for (int t = 0; t < EV_COUNT; t++) {
      if (!(r.handled & Bit(t))) want |= kNoBit[t];
      else if (r.noreply & Bit(t)) want |= kNrBit[t];
    }
    if (r.handled & Bit(EV_BODY)) want |= SMFIP_SKIP;
  }
  const uint32_t steps = want & static_cast<uint32_t>(f1);
  c->actions = actions;
  c->steps = steps;
  c->negotiated = true;
  RememberNegotiation(ctx, actions, steps);
  *pf0 = actions;
  *pf1 = steps;
  if (actions & SMFIF_SETSYMLIST) {
    for (int stage = 0; stage < 7; stage++) {
      if (!r.symlists[stage].empty()) smfi_setsymlist(ctx, stage, const_cast<char*>(r.symlists[stage].c_str()));
    }
  }
  return SMFIS_CONTINUE;
}

void DecodeAddr(_SOCK_ADDR* sa, Event* ev) {
  char buf[INET6_ADDRSTRLEN + 1] = {0};
  if (sa == nullptr) {
    ev->n0 = 0;  // unknown
    ev->strs.emplace_back();
    return;
  }
  const sockaddr* s = reinterpret_cast<const sockaddr*>(sa);
  switch (s->sa_family) {
    case AF_INET: {
      const sockaddr_in* in = reinterpret_cast<const sockaddr_in*>(s);
      inet_ntop(AF_INET, &in->sin_addr, buf, sizeof(buf));
      ev->n0 = 4;
      ev->n1 = ntohs(in->sin_port);
      ev->strs.emplace_back(buf);
      break;
    }
    case AF_INET6: {
      const sockaddr_in6* in6 = reinterpret_cast<const sockaddr_in6*>(s);
      inet_ntop(AF_INET6, &in6->sin6_addr, buf, sizeof(buf));
      ev->n0 = 6;
      ev->n1 = ntohs(in6->sin6_port);
      ev->strs.emplace_back(buf);
      break;
    }
    case AF_UNIX: {
      const sockaddr_un* un = reinterpret_cast<const sockaddr_un*>(s);
      ev->n0 = 1;
      ev->strs.emplace_back(un->sun_path, strnlen(un->sun_path, sizeof(un->sun_path)));
      break;
    }
    default:
      ev->n0 = 0;
      ev->strs.emplace_back();
  }
}

sfsistat OnConnect(SMFICTX* ctx, char* hostname, _SOCK_ADDR* hostaddr) {
  Conn* c = GetConn(ctx);
  if (c->refused_for_drain) {
    smfi_setreply(ctx, const_cast<char*>("421"), const_cast<char*>("4.3.2"),
                  const_cast<char*>("Mail filter is shutting down, try again later"));
    return SMFIS_TEMPFAIL;
  }
  if (!Handled(EV_CONNECT)) return SMFIS_CONTINUE;
  Event* ev = new Event();
  ev->type = EV_CONNECT;
  ev->strs.emplace_back(hostname ? hostname : "");
  DecodeAddr(hostaddr, ev);
  return Deliver(ctx, c, ev);
}

sfsistat Simple(SMFICTX* ctx, int type, const char* s) {
  if (!Handled(type)) return SMFIS_CONTINUE;
  Conn* c = GetConn(ctx);
  Event* ev = new Event();
  ev->type = static_cast<uint8_t>(type);
  if (s) ev->strs.emplace_back(s);
  return Deliver(ctx, c, ev);
}

sfsistat OnHelo(SMFICTX* ctx, char* helo) { return Simple(ctx, EV_HELO, helo ? helo : ""); }

sfsistat Argv(SMFICTX* ctx, int type, char** argv) {
  if (!Handled(type)) return SMFIS_CONTINUE;
  Conn* c = GetConn(ctx);
  Event* ev = new Event();
  ev->type = static_cast<uint8_t>(type);
  size_t n = 0;
  for (char** p = argv; p && *p; p++) n++;
  ev->strs.reserve(n);
  for (char** p = argv; p && *p; p++) ev->strs.emplace_back(*p);
  ev->n0 = n;  // argument count, before any captured macros
  return Deliver(ctx, c, ev);
}

sfsistat OnEnvfrom(SMFICTX* ctx, char** argv) { return Argv(ctx, EV_ENVFROM, argv); }
sfsistat OnEnvrcpt(SMFICTX* ctx, char** argv) { return Argv(ctx, EV_ENVRCPT, argv); }
sfsistat OnData(SMFICTX* ctx) { return Simple(ctx, EV_DATA, nullptr); }
sfsistat OnEoh(SMFICTX* ctx) { return Simple(ctx, EV_EOH, nullptr); }
sfsistat OnEom(SMFICTX* ctx) { return Simple(ctx, EV_EOM, nullptr); }
sfsistat OnUnknown(SMFICTX* ctx, const char* cmd) { return Simple(ctx, EV_UNKNOWN, cmd ? cmd : ""); }

sfsistat OnHeader(SMFICTX* ctx, char* name, char* value) {
  if (!Handled(EV_HEADER)) return SMFIS_CONTINUE;
  Conn* c = GetConn(ctx);
  Event* ev = new Event();
  ev->type = EV_HEADER;
  ev->strs.reserve(2);
  ev->strs.emplace_back(name ? name : "");
  ev->strs.emplace_back(value ? value : "");
  return Deliver(ctx, c, ev);
}

sfsistat OnBody(SMFICTX* ctx, unsigned char* chunk, size_t len) {
  if (!Handled(EV_BODY)) return SMFIS_CONTINUE;
  Conn* c = GetConn(ctx);
  Event* ev = new Event();
  ev->type = EV_BODY;
  ev->body = static_cast<char*>(malloc(len ? len : 1));
  if (len) memcpy(ev->body, chunk, len);
  ev->body_len = len;
  return Deliver(ctx, c, ev);
}

// abort and close never wait for JavaScript (close may run on the pool's
// controller thread while it holds the pool lock).
sfsistat OnAbort(SMFICTX* ctx) {
  Conn* c = static_cast<Conn*>(smfi_getpriv(ctx));
  if (!c || !Handled(EV_ABORT)) return SMFIS_CONTINUE;
  Event* ev = new Event();
  ev->type = EV_ABORT;
  Post(c, ev);
  return SMFIS_CONTINUE;
}

sfsistat OnClose(SMFICTX* ctx) {
  Conn* c = static_cast<Conn*>(smfi_getpriv(ctx));
  if (!c) return SMFIS_CONTINUE;
  smfi_setpriv(ctx, nullptr);
  {
    std::lock_guard<std::mutex> lk(c->mu);
    c->ctx = nullptr;
  }
  Unregister(c);
  State().deleted.fetch_add(1);
  if (c->refused_for_drain) State().drain_refused_closed.fetch_add(1);
  if (c->js_attached) {
    Event* ev = new Event();
    ev->type = EV_CLOSE;
    ev->conn = c;
    ev->conn_id = c->id;
    Enqueue(ev);
  }
  ConnUnref(c);
  return SMFIS_CONTINUE;
}

// ---- Delivery on the JavaScript thread.

inline bool IsAscii(const std::string& s) {
  for (unsigned char ch : s)
    if (ch >= 0x80) return false;
  return true;
}

// ASCII arrives as a string (the common case, and cheap); anything with
// 8-bit bytes arrives as a Buffer so nothing is lost on the way. The
// TypeScript layer decodes according to what the callback asked for.
Napi::Value Text(Napi::Env env, const std::string& s) {
  if (IsAscii(s)) {
    napi_value v;
    napi_create_string_latin1(env, s.data(), s.size(), &v);
    return Napi::Value(env, v);
  }
  return Napi::Buffer<char>::Copy(env, s.data(), s.size());
}

void DeliverOne(Napi::Env env, Napi::Function& fn, Event* ev) {
  Napi::HandleScope scope(env);
  napi_value args[9];
  napi_value undef = env.Undefined();
  for (napi_value& v : args) v = undef;
  args[0] = Napi::Number::New(env, ev->type);
  args[1] = Napi::Number::New(env, static_cast<double>(ev->conn_id));
  args[2] = Napi::Number::New(env, ev->seq);
  if (ev->first && ev->conn) {
    args[3] = Napi::External<Conn>::New(env, ev->conn, [](Napi::Env, Conn* c) { ConnUnref(c); });
  }
  switch (ev->type) {
    case EV_NEGOTIATE:
      args[4] = Napi::Number::New(env, static_cast<double>(ev->n0));
      args[5] = Napi::Number::New(env, static_cast<double>(ev->n1));
      break;
    case EV_CONNECT: {
      args[4] = Text(env, ev->strs[0]);
      args[5] = Napi::Number::New(env, static_cast<double>(ev->n0));
      args[6] = Text(env, ev->strs[1]);
      args[7] = Napi::Number::New(env, static_cast<double>(ev->n1));
      break;
    }
    case EV_ENVFROM:
    case EV_ENVRCPT: {
      Napi::Array arr = Napi::Array::New(env, ev->n0);
      for (size_t i = 0; i < ev->n0; i++) arr.Set(static_cast<uint32_t>(i), Text(env, ev->strs[i]));
      args[4] = arr;
      break;
    }
    case EV_HEADER:
      args[4] = Text(env, ev->strs[0]);
      args[5] = Text(env, ev->strs[1]);
      break;
    case EV_HELO:
    case EV_UNKNOWN:
      args[4] = Text(env, ev->strs[0]);
      break;
    case EV_BODY: {
      char* data = ev->body;
      ev->body = nullptr;
      args[4] = Napi::Buffer<char>::New(env, data, ev->body_len, [](Napi::Env, char* p) { free(p); });
      break;
    }
    case EV_STOPPED:
      args[4] = Napi::String::New(env, ev->error);
      break;
    default:
      break;
  }
  if (!ev->macros.empty()) {
    Napi::Array m = Napi::Array::New(env, ev->macros.size());
    for (size_t i = 0; i < ev->macros.size(); i++) m.Set(static_cast<uint32_t>(i), Napi::String::New(env, ev->macros[i]));
    args[8] = m;
  }
  napi_value result;
  napi_status st = napi_call_function(env, env.Undefined(), fn, 9, args, &result);
  if (st == napi_pending_exception) {
    napi_value err;
    napi_get_and_clear_last_exception(env, &err);
    napi_fatal_exception(env, err);
  }
}

void CallJs(Napi::Env env, Napi::Function fn, std::nullptr_t*, void*);
using Tsfn = Napi::TypedThreadSafeFunction<std::nullptr_t, void, CallJs>;
// The one channel from libmilter's threads to the JavaScript thread.
Tsfn g_tsfn;

void CallJs(Napi::Env env, Napi::Function fn, std::nullptr_t*, void*) {
  Addon& a = State();
  std::vector<Event*> batch;
  if (env == nullptr) {
    std::lock_guard<std::mutex> lk(a.qmu);
    for (Event* ev : a.queue) delete ev;
    a.queue.clear();
    a.wake_pending = false;
    return;
  }
  // wake_pending stays set while this loop drains the queue, so workers that
  // enqueue meanwhile do not wake the event loop again: their events are
  // picked up by the next round. A few rounds at most, so that promise
  // callbacks and timers get their turn.
  for (int round = 0;; round++) {
    {
      std::lock_guard<std::mutex> lk(a.qmu);
      if (a.queue.empty() || round == 4) {
        if (!a.queue.empty() && a.tsfn_live) g_tsfn.NonBlockingCall(nullptr);  // more to do: come back
        else a.wake_pending = false;
        return;
      }
      batch.swap(a.queue);
    }
    bool stopped = false;
    for (Event* ev : batch) {
      if (ev->type == EV_STOPPED) stopped = true;
      DeliverOne(env, fn, ev);
      delete ev;
    }
    batch.clear();
    if (stopped) {
      std::lock_guard<std::mutex> lk(a.qmu);
      if (a.tsfn_live) {
        a.tsfn_live = false;
        g_tsfn.Release();
      }
      a.wake_pending = false;
      return;
    }
  }
}

}  // namespace

void Enqueue(Event* ev) {
  Addon& a = State();
  bool wake = false;
  {
    std::lock_guard<std::mutex> lk(a.qmu);
    if (!a.tsfn_live) {
      delete ev;
      return;
    }
    a.queue.push_back(ev);
    if (!a.wake_pending) {
      a.wake_pending = true;
      wake = true;
    }
    if (wake) g_tsfn.NonBlockingCall(nullptr);
  }
}

void ConnUnref(Conn* c) {
  if (c->refs.fetch_sub(1) == 1) delete c;
}

void WakeAllParked(int status) {
  Addon& a = State();
  std::lock_guard<std::mutex> lk(a.cmu);
  for (Conn* c = a.conns; c; c = c->next) {
    std::lock_guard<std::mutex> clk(c->mu);
    if (c->waiting && !c->answered) {
      c->answered = true;
      c->status = status;
      c->cv.notify_all();
    }
  }
}

struct smfiDesc kDesc = {
    const_cast<char*>("nodemilter"),
    SMFI_VERSION,
    SMFIF_ADDHDRS | SMFIF_CHGBODY | SMFIF_ADDRCPT | SMFIF_DELRCPT | SMFIF_CHGHDRS | SMFIF_QUARANTINE |
        SMFIF_CHGFROM | SMFIF_ADDRCPT_PAR | SMFIF_SETSYMLIST,
    OnConnect,
    OnHelo,
    OnEnvfrom,
    OnEnvrcpt,
    OnHeader,
    OnEoh,
    OnBody,
    OnEom,
    OnAbort,
    OnClose,
    OnUnknown,
    OnData,
    OnNegotiate,
};

namespace {

// start(onEvent): create the thread-safe function that carries events.
Napi::Value CreateChannel(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Addon& a = State();
  if (!info[0].IsFunction()) {
    Napi::TypeError::New(env, "event handler must be a function").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  std::lock_guard<std::mutex> lk(a.qmu);
  if (a.tsfn_live) {
    Napi::Error::New(env, "event channel already open").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  g_tsfn = Tsfn::New(env, info[0].As<Napi::Function>(), "nodemilter", 0, 1);
  a.tsfn_live = true;
  return env.Undefined();
}

Napi::Value RefChannel(const Napi::CallbackInfo& info) {
  Addon& a = State();
  const bool ref = info[0].ToBoolean();
  std::lock_guard<std::mutex> lk(a.qmu);
  if (a.tsfn_live) {
    if (ref) g_tsfn.Ref(info.Env());
    else g_tsfn.Unref(info.Env());
  }
  return info.Env().Undefined();
}

// reply(conn, seq, status[, actions, steps]) -> true if the answer was taken.
Napi::Value Reply(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Conn* c = UnwrapConn(info[0]);
  if (!c) return Napi::Boolean::New(env, false);
  const uint32_t seq = info[1].As<Napi::Number>().Uint32Value();
  const int status = info[2].As<Napi::Number>().Int32Value();
  {
    std::lock_guard<std::mutex> lk(c->mu);
    if (!c->waiting || c->answered || c->seq != seq) {
      State().late_answers.fetch_add(1);
      return Napi::Boolean::New(env, false);
    }
    if (info.Length() >= 5) {
      c->neg_actions = info[3].As<Napi::Number>().Uint32Value();
      c->neg_steps = info[4].As<Napi::Number>().Uint32Value();
    }
    c->status = status;
    c->answered = true;
  }
  // Wake the worker after unlocking: woken under the lock it would at once
  // block again on c->mu (one more futex wait and wake, and a context
  // switch, per answer). c stays alive: the External in info[0] holds a ref.
  c->cv.notify_one();
  return Napi::Boolean::New(env, true);
}

}  // namespace


void InitDispatch(Napi::Env env, Napi::Object exports) {
  exports.Set("openChannel", Napi::Function::New(env, CreateChannel, "openChannel"));
  exports.Set("refChannel", Napi::Function::New(env, RefChannel, "refChannel"));
  exports.Set("reply", Napi::Function::New(env, Reply, "reply"));
}

void SetWatchList(std::vector<std::string> names) { g_watch = std::move(names); }

}  // namespace nodemilter
