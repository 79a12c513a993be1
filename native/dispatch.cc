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

#include <cstddef>
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

// smfi_getsymval walks a stage's macro list two entries at a time. A MACRO
// command with an odd number of strings (a broken or hostile MTA) makes it
// step over the list's terminating NULL and read past the allocation, which
// can crash the process. libmilter offers no way to see the lists, so the
// guard reads them from libmilter's struct smfi_str, mirrored below from
// sendmail 8.14+'s libmilter.h up to the private-data pointer. Only the
// number of macro stages (MAX_MACROS_ENTRIES: 7 in 8.14 to 8.18) is not
// fixed; calibration finds it from where our private-data pointer sits, and
// then checks what it can: the word there equals smfi_getpriv(), ctx_smfi
// points to a descriptor with our callbacks, and every stage's mac_ptr and
// mac_buf are both set or both NULL, the first entry pointing into the
// buffer. If any check fails the guard is off: macros are then not read
// from libmilter at all (getsymval answers undefined), and JavaScript is
// told once, loudly (EV_WARNING).
constexpr int kMaxStages = 8;
struct MirroredCtx {
  unsigned int ctx_id;
  int ctx_sd;  // socket_t
  int ctx_dbg;
  time_t ctx_timeout;
  int ctx_state;
  smfiDesc_ptr ctx_smfi;
  int ctx_prot_vers;
  unsigned long ctx_aflags;
  unsigned long ctx_pflags;
  unsigned long ctx_pflags2mta;
  int ctx_prot_vers2mta;
  char** ctx_mac_ptr[1];  // [stages], then ctx_mac_buf[stages], ctx_mac_list[stages], ctx_reply, ctx_privdata
};
constexpr size_t kMacPtrOffset = offsetof(MirroredCtx, ctx_mac_ptr);
static_assert(sizeof(void*) != 8 || (sizeof(time_t) == 8 && sizeof(long) == 8 && kMacPtrOffset == 80),
              "LP64: libmilter's ctx_mac_ptr follows 80 bytes of fixed fields");
static_assert(sizeof(void*) != 4 || sizeof(time_t) != 4 || kMacPtrOffset == 44,
              "ILP32 with a 32-bit time_t: ctx_mac_ptr follows 44 bytes of fixed fields");

// -2: not calibrated; -1: layout not recognised (guard off); else the stage count.
std::atomic<int> g_stages{-2};
std::mutex g_calmu;
std::string g_guard_problem;

inline char** Word(SMFICTX* ctx, size_t off) {
  char** v;
  memcpy(&v, reinterpret_cast<const char*>(ctx) + off, sizeof(v));
  return v;
}

// Returns the stage count, or -1 with `why` set.
int Calibrate(SMFICTX* ctx, const void* priv, std::string& why) {
  const size_t ptr = sizeof(void*);
  int stages = -1;
  for (int n = 4; n <= kMaxStages; n++) {
    if (Word(ctx, kMacPtrOffset + (3 * n + 1) * ptr) == priv) {
      stages = n;
      break;
    }
  }
  if (stages < 0) {
    why = "the private-data pointer is not where sendmail 8.14+'s struct smfi_str has it";
    return -1;
  }
  smfiDesc_ptr desc;
  memcpy(&desc, reinterpret_cast<const char*>(ctx) + offsetof(MirroredCtx, ctx_smfi), sizeof(desc));
  if (desc == nullptr || desc->xxfi_negotiate != Callbacks().xxfi_negotiate || desc->xxfi_body != Callbacks().xxfi_body) {
    why = "ctx_smfi does not point to this milter's descriptor";
    return -1;
  }
  for (int i = 0; i < stages; i++) {
    char** list = Word(ctx, kMacPtrOffset + i * ptr);
    char* buf = reinterpret_cast<char*>(Word(ctx, kMacPtrOffset + (stages + i) * ptr));
    if ((list == nullptr) != (buf == nullptr) || (list != nullptr && list[0] != nullptr && list[0] < buf)) {
      why = "ctx_mac_ptr and ctx_mac_buf disagree for stage " + std::to_string(i);
      return -1;
    }
  }
  return stages;
}

void WarnGuardOff(const std::string& why) {
  Event* ev = new Event();
  ev->type = EV_WARNING;
  ev->error = "libmilter's context layout was not recognised (" + why +
              "): the guard against malformed macro lists is off, so macros are not read from libmilter and "
              "getsymval() answers undefined except for the macros captured with no-reply events; see "
              "docs/native.md, \"The macro guard\"";
  Enqueue(ev);
}

}  // namespace

int MacroLayout() { return g_stages.load(); }

std::string MacroGuardProblem() {
  std::lock_guard<std::mutex> lk(g_calmu);
  return g_guard_problem;
}

bool MacrosSafe(SMFICTX* ctx) {
  if (ctx == nullptr) return false;
  int stages = g_stages.load();
  if (stages == -2) {
    const void* priv = smfi_getpriv(ctx);
    if (priv == nullptr) return false;
    std::string why;
    bool warn = false;
    {
      std::lock_guard<std::mutex> lk(g_calmu);
      stages = g_stages.load();
      if (stages == -2) {
        stages = Calibrate(ctx, priv, why);
        g_stages.store(stages);
        if (stages < 0) {
          g_guard_problem = why;
          warn = true;
        }
      }
    }
    if (warn) WarnGuardOff(why);
  }
  if (stages < 0) return false;
  for (int i = 0; i < stages; i++) {
    char** list = Word(ctx, kMacPtrOffset + i * sizeof(void*));
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

// ---- Delivery on the JavaScript thread.

void DeliverOne(napi_env raw, napi_value fn, Event* ev) {
  Napi::Env env(raw);
  Napi::HandleScope scope(env);
  napi_value args[9];
  napi_value undef = env.Undefined();
  for (napi_value& v : args) v = undef;
  args[0] = Napi::Number::New(env, ev->type);
  args[1] = Napi::Number::New(env, static_cast<double>(ev->conn_id));
  args[2] = Napi::Number::New(env, ev->seq);
  if (ev->first && ev->conn) {
    args[3] = WrapConn(env, ev->conn);
    ev->first = false;  // the External holds the reference now
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
    case EV_WARNING:
      args[4] = Napi::String::New(env, ev->error);
      break;
    case EV_ACTION_FAILED:
      args[4] = Napi::String::New(env, ev->strs[0]);
      args[5] = Napi::String::New(env, ev->strs[1]);
      args[6] = Napi::Number::New(env, static_cast<double>(ev->n0));
      args[7] = Napi::Number::New(env, static_cast<double>(ev->n1));
      break;
    default:
      break;
  }
  if (!ev->macros.empty()) {
    Napi::Array m = Napi::Array::New(env, ev->macros.size());
    for (size_t i = 0; i < ev->macros.size(); i++) m.Set(static_cast<uint32_t>(i), Text(env, ev->macros[i]));
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

// An event nobody will deliver: give back the Conn reference it holds.
void Drop(Event* ev) {
  if (ev->first && ev->conn) ConnUnref(ev->conn);
  delete ev;
}

// Takes queued events off the count (under qmu) and wakes workers waiting
// for room.
void Uncount(Addon& a, const std::vector<Event*>& batch) {
  bool freed = false;
  for (Event* ev : batch) {
    if (!ev->bytes) continue;
    a.queued_bytes -= ev->bytes;
    if (ev->conn) ev->conn->queued_bytes -= ev->bytes;
    freed = true;
  }
  if (freed) a.qcv.notify_all();
}

void ReleaseChannel(Addon& a) {
  if (a.tsfn_live) {
    a.tsfn_live = false;
    napi_release_threadsafe_function(a.tsfn, napi_tsfn_release);
  }
  a.qcv.notify_all();
}

void CallJs(napi_env env, napi_value fn, void*, void*) {
  Addon& a = State();
  std::vector<Event*> batch;
  if (env == nullptr) {
    std::lock_guard<std::mutex> lk(a.qmu);
    Uncount(a, a.queue);
    for (Event* ev : a.queue) Drop(ev);
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
        if (!a.queue.empty() && a.tsfn_live) napi_call_threadsafe_function(a.tsfn, nullptr, napi_tsfn_nonblocking);
        else a.wake_pending = false;
        return;
      }
      batch.swap(a.queue);
      Uncount(a, batch);
    }
    bool stopped = false;
    for (Event* ev : batch) {
      if (ev->type == EV_STOPPED) stopped = true;
      if (a.closing.load()) Drop(ev);
      else {
        DeliverOne(env, fn, ev);
        delete ev;
      }
    }
    batch.clear();
    if (stopped) {
      std::lock_guard<std::mutex> lk(a.qmu);
      ReleaseChannel(a);
      a.wake_pending = false;
      return;
    }
  }
}

// The thread-safe function is gone (released, or its environment torn down).
void ChannelFinalized(napi_env, void*, void*) {
  Addon& a = State();
  std::lock_guard<std::mutex> lk(a.qmu);
  a.tsfn_live = false;
  a.tsfn = nullptr;
  a.qcv.notify_all();
}

}  // namespace

bool Enqueue(Event* ev) {
  Addon& a = State();
  std::unique_lock<std::mutex> lk(a.qmu);
  if (ev->bytes) {
    // Bounded memory: a worker queueing a no-reply event waits while the
    // queue is over either mark, until JavaScript takes events off it.
    Conn* c = ev->conn;
    bool counted_wait = false;
    while (a.tsfn_live && !a.closing.load() &&
           (a.queued_bytes >= kQueueHighWater || c->queued_bytes >= kSessionQueueHighWater)) {
      if (!counted_wait) a.queue_waits.fetch_add(1);
      counted_wait = true;
      a.qcv.wait_for(lk, std::chrono::milliseconds(100));
    }
  }
  if (!a.tsfn_live) {
    lk.unlock();
    Drop(ev);
    return false;
  }
  if (ev->bytes) {
    a.queued_bytes += ev->bytes;
    ev->conn->queued_bytes += ev->bytes;
    if (a.queued_bytes > a.queue_peak.load()) a.queue_peak.store(a.queued_bytes);
  }
  a.queue.push_back(ev);
  if (!a.wake_pending) {
    a.wake_pending = true;
    napi_call_threadsafe_function(a.tsfn, nullptr, napi_tsfn_nonblocking);
  }
  return true;
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
      c->status = c->waiting_type == EV_NEGOTIATE ? SMFIS_ALL_OPTS : status;
      c->pending.clear();
      c->cv.notify_all();
    }
  }
}

void CloseChannel() {
  Addon& a = State();
  a.closing.store(true);
  {
    std::lock_guard<std::mutex> lk(a.qmu);
    // The environment's teardown finalizes the thread-safe function itself;
    // from here on nothing may call it.
    a.tsfn_live = false;
    a.qcv.notify_all();
  }
  WakeAllParked(a.reg.fallback_status);
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

// openChannel(onEvent): create the thread-safe function that carries events.
Napi::Value OpenChannel(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Addon& a = State();
  if (!ClaimOwner(env, "openChannel()")) return env.Undefined();
  if (!info[0].IsFunction()) {
    Napi::TypeError::New(env, "event handler must be a function").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  std::lock_guard<std::mutex> lk(a.qmu);
  if (a.tsfn_live || a.tsfn) {
    Napi::Error::New(env, "event channel already open").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  napi_threadsafe_function tsfn;
  napi_status st = napi_create_threadsafe_function(env, info[0], nullptr, Napi::String::New(env, "nodemilter"), 0, 1,
                                                   nullptr, ChannelFinalized, nullptr, CallJs, &tsfn);
  if (st != napi_ok) {
    Napi::Error::New(env, "could not create the event channel").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  a.tsfn = tsfn;
  a.tsfn_live = true;
  return env.Undefined();
}

Napi::Value RefChannel(const Napi::CallbackInfo& info) {
  Addon& a = State();
  const bool ref = info[0].ToBoolean();
  if (State().owner != Env(info.Env())) return info.Env().Undefined();
  std::lock_guard<std::mutex> lk(a.qmu);
  if (a.tsfn_live) {
    if (ref) napi_ref_threadsafe_function(info.Env(), a.tsfn);
    else napi_unref_threadsafe_function(info.Env(), a.tsfn);
  }
  return info.Env().Undefined();
}

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
  }
  // Wake the worker after unlocking: woken under the lock it would at once
  // block again on c->mu (one more futex wait and wake, and a context
  // switch, per answer). c stays alive: the External in info[0] holds a ref.
  c->cv.notify_one();
  return Napi::Boolean::New(env, true);
}

}  // namespace

void InitDispatch(Napi::Env env, Napi::Object exports) {
  exports.Set("openChannel", Napi::Function::New(env, OpenChannel, "openChannel"));
  exports.Set("refChannel", Napi::Function::New(env, RefChannel, "refChannel"));
  exports.Set("reply", Napi::Function::New(env, Reply, "reply"));
}

}  // namespace nodemilter
