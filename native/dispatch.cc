// libmilter's callbacks, and how each one reaches JavaScript and back.
//
// Every callback runs on a libmilter worker thread. It copies what libmilter
// handed it into an Event and queues it for JavaScript (channel.cc; the
// values are turned into JavaScript ones in marshal.cc). An event the MTA needs an answer for parks
// its worker thread on the session's condition variable until JavaScript
// answers or the deadline passes; an event the MTA does not wait for
// (no-reply steps, abort, close) is queued and the worker returns at once.
// A session's callbacks never overlap, so the queue keeps each session's
// events in protocol order.

#include <cstring>
#include <chrono>

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

void Link(Conn* c) {
  Addon& a = State();
  std::lock_guard<std::mutex> lk(a.cmu);
  c->next = a.conns;
  if (a.conns) a.conns->prev = c;
  a.conns = c;
}

void Unlink(Conn* c) {
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
// holds at most one entry per context address ever in use. It lives in the
// Addon, which is never destroyed: a worker may still negotiate during exit().
void RememberNegotiation(Conn* c, SMFICTX* ctx, uint32_t actions, uint32_t steps) {
  Addon& a = State();
  {
    std::lock_guard<std::mutex> lk(c->mu);
    c->actions = actions;
    c->steps = steps;
    c->negotiated = true;
  }
  std::lock_guard<std::mutex> lk(a.negmu);
  a.negotiated[ctx] = {actions, steps};
}

Conn* GetConn(SMFICTX* ctx, bool negotiating = false) {
  NoteLibmilterThread();
  Conn* c = static_cast<Conn*>(smfi_getpriv(ctx));
  if (c) return c;
  Addon& a = State();
  c = new Conn();
  c->ctx = ctx;
  c->id = a.next_conn_id.fetch_add(1);
  if (!negotiating) {
    std::lock_guard<std::mutex> lk(a.negmu);
    auto it = a.negotiated.find(ctx);
    if (it != a.negotiated.end()) {
      c->actions = it->second.actions;
      c->steps = it->second.steps;
      c->negotiated = true;
    }
    // A session after QUIT_NC skips negotiation: it counts against the cap
    // (it was admitted with the connection), though it cannot be refused.
    if (a.reg.max_sessions > 0) {
      a.sessions_live.fetch_add(1);
      c->counted = true;
    }
  }
  smfi_setpriv(ctx, c);
  Link(c);
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

void CaptureMacros(SMFICTX* ctx, Event* ev) {
  if (!MacrosSafe(ctx)) return;
  for (const std::string& name : State().reg.watch) {
    const char* v = smfi_getsymval(ctx, const_cast<char*>(name.c_str()));
    if (v) {
      ev->macros.push_back(name);
      ev->macros.push_back(v);
    }
  }
}

inline bool Handled(int type) { return State().reg.handled & Bit(type); }

// The bytes an event holds, counted against the queue bound.
size_t EventBytes(const Event* ev) {
  size_t n = sizeof(Event) + ev->body_len;
  for (const std::string& s : ev->strs) n += s.size();
  for (const std::string& s : ev->macros) n += s.size();
  return n;
}

// Queue an event the MTA does not wait for; returns the status for libmilter.
// `bounded`: the worker may wait here for room in the queue (never in abort
// or close, see OnAbort).
sfsistat Post(Conn* c, Event* ev, bool bounded) {
  Attach(c, ev);
  const uint32_t nr = kNrBit[ev->type];
  uint32_t steps;
  {
    std::lock_guard<std::mutex> lk(c->mu);
    steps = c->steps;
  }
  if (bounded) ev->bytes = EventBytes(ev);
  Enqueue(ev);
  return (nr && (steps & nr)) ? SMFIS_NOREPLY : SMFIS_CONTINUE;
}

void SetFallbackReply(SMFICTX* ctx, int status, const char* why) {
  if (ctx == nullptr) return;
  if (status == SMFIS_TEMPFAIL) {
    smfi_setreply(ctx, const_cast<char*>("451"), const_cast<char*>("4.3.0"), const_cast<char*>(why));
  } else if (status == SMFIS_REJECT) {
    smfi_setreply(ctx, const_cast<char*>("554"), const_cast<char*>("5.3.0"), const_cast<char*>(why));
  }
}

// The answer when JavaScript cannot answer a step: the fallback status with
// its reply, or for negotiate the defaults (ALL_OPTS), as the JavaScript
// failure path answers it (a negotiate that fails aborts the session in
// libmilter).
sfsistat Unanswered(SMFICTX* ctx, int type, const char* why) {
  if (type == EV_NEGOTIATE) return SMFIS_ALL_OPTS;
  const int st = State().reg.fallback_status;
  SetFallbackReply(ctx, st, why);
  return st;
}

// Spins until `flag` is set or `ns` nanoseconds pass; true if it was set.
bool SpinFor(const std::atomic<bool>& flag, int64_t ns) {
  const auto until = Clock::now() + std::chrono::nanoseconds(ns);
  for (;;) {
    for (int i = 0; i < 64; i++) {
      if (flag.load(std::memory_order_acquire)) return true;
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#elif defined(__aarch64__)
      asm volatile("yield");
#endif
    }
    if (Clock::now() >= until) return flag.load(std::memory_order_acquire);
  }
}

// Queue an event and park this worker until JavaScript answers or the
// deadline passes. The worker writes the actions JavaScript recorded (at
// once for a progress, else with the answer), with the session lock
// released, so a slow MTA holds this worker only. During EOM it sends
// progress while waiting.
sfsistat Wait(SMFICTX* ctx, Conn* c, Event* ev) {
  Addon& a = State();
  const int type = ev->type;
  Attach(c, ev);
  std::unique_lock<std::mutex> lk(c->mu);
  c->seq += 1;
  if (c->seq == 0) c->seq = 1;
  const uint32_t seq = c->seq;
  ev->seq = seq;
  c->waiting = true;
  c->waiting_type = static_cast<uint8_t>(type);
  c->answered = false;
  c->answered_hint.store(false, std::memory_order_relaxed);
  c->pending.clear();
  c->flush_now = false;
  // After stop (or while the owner environment goes away) nobody will see
  // the event: answer at once instead of waiting out the deadline.
  if (a.closing.load() || !Enqueue(ev)) {
    c->waiting = false;
    return Unanswered(ctx, type, "Mail filter is stopping");
  }

  const int64_t deadline_ms = a.reg.deadline_ms[type] > 0 ? a.reg.deadline_ms[type] : 8000;
  const auto deadline = Clock::now() + std::chrono::milliseconds(deadline_ms);
  const bool progress = type == EV_EOM && a.reg.progress_ms > 0;
  auto next_progress = Clock::now() + std::chrono::milliseconds(a.reg.progress_ms);
  bool ok = true;
  // Spin only when this is the one worker waiting and the process serves
  // fewer sessions than there are CPUs: with more, the cores are busy with
  // the other sessions (and the MTA), and a spin takes one from them.
  const bool alone = a.waiting_workers.fetch_add(1, std::memory_order_relaxed) == 0;
  if (alone && a.spin_ns > 0 &&
      a.created.load(std::memory_order_relaxed) - a.deleted.load(std::memory_order_relaxed) < a.spin_below_sessions) {
    lk.unlock();
    if (SpinFor(c->answered_hint, a.spin_ns)) a.spin_hits.fetch_add(1, std::memory_order_relaxed);
    else a.spin_misses.fetch_add(1, std::memory_order_relaxed);
    lk.lock();
  }
  struct Unpark {
    Addon& a;
    ~Unpark() { a.waiting_workers.fetch_sub(1, std::memory_order_relaxed); }
  } unpark{a};
  for (;;) {
    if (!c->pending.empty() && (c->answered || c->flush_now)) {
      std::vector<Action> batch;
      batch.swap(c->pending);
      c->flush_now = false;
      lk.unlock();
      if (ok) ok = WriteActions(c, ctx, seq, batch);
      lk.lock();
      continue;
    }
    if (c->answered) break;
    auto until = deadline;
    if (progress && next_progress < until) until = next_progress;
    c->cv.wait_until(lk, until);
    if (c->answered || c->flush_now) continue;
    const auto now = Clock::now();
    if (now >= deadline) {
      c->waiting = false;
      c->pending.clear();
      lk.unlock();
      a.deadline_expired.fetch_add(1);
      return Unanswered(ctx, type, "Mail filter did not answer in time");
    }
    if (progress && now >= next_progress) {
      lk.unlock();
      smfi_progress(ctx);
      a.progress_sent.fetch_add(1);
      lk.lock();
      next_progress = now + std::chrono::milliseconds(a.reg.progress_ms);
    }
  }
  c->waiting = false;
  const int status = c->status;
  lk.unlock();
  // A modification that did not reach the MTA must not let the message pass
  // as if it had (the failure itself went to JavaScript).
  if (!ok && type != EV_NEGOTIATE && status != SMFIS_REJECT && status != SMFIS_DISCARD)
    return Unanswered(ctx, type, "Mail filter could not apply its changes");
  return status;
}

sfsistat Deliver(SMFICTX* ctx, Conn* c, Event* ev) {
  const uint32_t b = Bit(ev->type);
  if (State().reg.noreply & b) {
    if (ev->type <= EV_ENVRCPT || ev->type == EV_DATA || ev->type == EV_EOH) CaptureMacros(ctx, ev);
    return Post(c, ev, true);
  }
  return Wait(ctx, c, ev);
}

// ---- The libmilter callbacks.

// Refuse the session (draining, or over the session cap) at connect: make
// sure connect reaches us, with a reply to every step.
sfsistat Refuse(SMFICTX* ctx, Conn* c, Conn::Refusal why, unsigned long* pf0, unsigned long* pf1) {
  {
    std::lock_guard<std::mutex> lk(c->mu);
    c->refused = why;
  }
  *pf0 = 0;
  *pf1 = 0;
  RememberNegotiation(c, ctx, 0, 0);
  return SMFIS_CONTINUE;
}

sfsistat OnNegotiate(SMFICTX* ctx, unsigned long f0, unsigned long f1, unsigned long, unsigned long,
                     unsigned long* pf0, unsigned long* pf1, unsigned long* pf2, unsigned long* pf3) {
  Addon& a = State();
  Conn* c = GetConn(ctx, true);
  const Registration& r = a.reg;
  *pf2 = 0;
  *pf3 = 0;
  if (a.draining.load()) {
    a.drain_refused.fetch_add(1);
    return Refuse(ctx, c, Conn::DRAINING, pf0, pf1);
  }
  // The session cap, before any worker parks for this session.
  if (r.max_sessions > 0 && !c->counted) {
    if (a.sessions_live.fetch_add(1) >= r.max_sessions) {
      a.sessions_live.fetch_sub(1);
      a.sessions_refused.fetch_add(1);
      {
        std::lock_guard<std::mutex> lk(c->mu);
        c->refused = Conn::OVER_CAP;
      }
      // Closing: a negotiate that does not answer CONTINUE or ALL_OPTS makes
      // libmilter drop the connection; the MTA applies its failure action.
      if (r.cap_closes) return SMFIS_REJECT;
      return Refuse(ctx, c, Conn::OVER_CAP, pf0, pf1);
    }
    c->counted = true;
  }
  if (r.dynamic_negotiate && (r.handled & Bit(EV_NEGOTIATE))) {
    Event* ev = new Event();
    ev->type = EV_NEGOTIATE;
    ev->n0 = f0;
    ev->n1 = f1;
    const sfsistat st = Wait(ctx, c, ev);
    uint32_t actions = 0, steps = 0;
    if (st == SMFIS_CONTINUE) {
      std::lock_guard<std::mutex> lk(c->mu);
      actions = c->neg_actions & f0;
      steps = c->neg_steps & f1;
      *pf0 = actions;
      *pf1 = steps;
    } else if (st == SMFIS_ALL_OPTS) {
      actions = f0 & a.desc.xxfi_flags;
    }
    RememberNegotiation(c, ctx, actions, steps);
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
  RememberNegotiation(c, ctx, actions, steps);
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
  Conn::Refusal refused;
  {
    std::lock_guard<std::mutex> lk(c->mu);
    refused = c->refused;
  }
  if (refused != Conn::NONE) {
    smfi_setreply(ctx, const_cast<char*>("421"), const_cast<char*>("4.3.2"),
                  const_cast<char*>(refused == Conn::DRAINING ? "Mail filter is shutting down, try again later"
                                                              : "Mail filter is busy, try again later"));
    return SMFIS_TEMPFAIL;
  }
  if (!Handled(EV_CONNECT)) return SMFIS_CONTINUE;
  Event* ev = new Event();
  ev->type = EV_CONNECT;
  ev->strs.emplace_back(hostname ? hostname : "");
  DecodeAddr(hostaddr, ev);
  return Deliver(ctx, c, ev);
}

sfsistat OnSimple(SMFICTX* ctx, int type, const char* s) {
  if (!Handled(type)) return SMFIS_CONTINUE;
  Conn* c = GetConn(ctx);
  Event* ev = new Event();
  ev->type = static_cast<uint8_t>(type);
  if (s) ev->strs.emplace_back(s);
  return Deliver(ctx, c, ev);
}

sfsistat OnHelo(SMFICTX* ctx, char* helo) { return OnSimple(ctx, EV_HELO, helo ? helo : ""); }

sfsistat OnArgv(SMFICTX* ctx, int type, char** argv) {
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

sfsistat OnEnvfrom(SMFICTX* ctx, char** argv) { return OnArgv(ctx, EV_ENVFROM, argv); }
sfsistat OnEnvrcpt(SMFICTX* ctx, char** argv) { return OnArgv(ctx, EV_ENVRCPT, argv); }
sfsistat OnData(SMFICTX* ctx) { return OnSimple(ctx, EV_DATA, nullptr); }
sfsistat OnEoh(SMFICTX* ctx) { return OnSimple(ctx, EV_EOH, nullptr); }
sfsistat OnEom(SMFICTX* ctx) { return OnSimple(ctx, EV_EOM, nullptr); }
sfsistat OnUnknown(SMFICTX* ctx, const char* cmd) { return OnSimple(ctx, EV_UNKNOWN, cmd ? cmd : ""); }

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
// controller thread while it holds the pool lock), not even for room in the
// queue; they are small.
sfsistat OnAbort(SMFICTX* ctx) {
  Conn* c = static_cast<Conn*>(smfi_getpriv(ctx));
  if (!c || !Handled(EV_ABORT)) return SMFIS_CONTINUE;
  Event* ev = new Event();
  ev->type = EV_ABORT;
  Post(c, ev, false);
  return SMFIS_CONTINUE;
}

sfsistat OnClose(SMFICTX* ctx) {
  Addon& a = State();
  Conn* c = static_cast<Conn*>(smfi_getpriv(ctx));
  if (!c) return SMFIS_CONTINUE;
  smfi_setpriv(ctx, nullptr);
  Conn::Refusal refused;
  {
    std::lock_guard<std::mutex> lk(c->mu);
    c->ctx = nullptr;
    refused = c->refused;
  }
  Unlink(c);
  a.deleted.fetch_add(1);
  if (c->counted) a.sessions_live.fetch_sub(1);
  if (refused == Conn::DRAINING) a.drain_refused_closed.fetch_add(1);
  if (refused == Conn::OVER_CAP) a.sessions_refused_closed.fetch_add(1);
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

}  // namespace

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
      c->status = c->waiting_type == EV_NEGOTIATE ? SMFIS_ALL_OPTS : status;
      c->pending.clear();
      c->cv.notify_all();
    }
  }
}

const struct smfiDesc& Callbacks() {
  static const struct smfiDesc callbacks = {
      nullptr,
      SMFI_VERSION,
      0,
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
  return callbacks;
}

namespace {

// reply(conn, seq, status[, actions, steps]) -> true if the answer was taken.
Napi::Value Reply(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Conn* c = UnwrapConn(env, info[0]);
  if (!c || !info[1].IsNumber() || !info[2].IsNumber()) return Napi::Boolean::New(env, false);
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
    c->answered_hint.store(true, std::memory_order_release);
  }
  // Wake the worker after unlocking: woken under the lock it would at once
  // block again on c->mu (one more futex wait and wake, and a context
  // switch, per answer). c stays alive: the External in info[0] holds a ref.
  // Inside a round of events, the wake-up waits for the round's end.
  Addon& a = State();
  if (a.delivering) {
    c->refs.fetch_add(1);
    a.answered_in_round.push_back(c);
  } else {
    c->cv.notify_one();
  }
  return Napi::Boolean::New(env, true);
}

}  // namespace

void InitDispatch(Napi::Env env, Napi::Object exports) {
  exports.Set("reply", Napi::Function::New(env, Reply, "reply"));
}

}  // namespace nodemilter
