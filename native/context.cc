// The per-session actions JavaScript may call (smfi_setreply, smfi_addheader,
// ...), and the writing of the modifications on the session's worker.
//
// libmilter's modification calls write to the session socket, blocking
// until the MTA reads (up to the session timeout, then a writev without
// any). So JavaScript never calls them: an action checks, on the JavaScript
// thread and under the session lock, that the session's worker is parked in
// the very callback (seq) the caller belongs to, that this is eom and that
// the action's flag was negotiated (what libmilter's mi_sendok checks), and
// records the action; the parked worker writes the recorded actions before
// the answer (WriteActions). A write that fails is reported to JavaScript
// as an EV_ACTION_FAILED event. setreply and setsymlist only store values
// in libmilter's context (no I/O) and run at once. Each call returns a code
// the TypeScript layer turns into a typed error; validation of the values
// themselves happens there.

#include <cerrno>
#include <cstring>

#include "engine.h"

namespace nodemilter {

namespace {

enum ActionCode {
  OK = 0,
  CLOSED = 1,      // libmilter has closed the session
  NOT_PARKED = 2,  // the callback this call belongs to has already been answered
  NOT_IN_EOM = 3,  // a modification outside end of message
  FAILURE = 4,     // libmilter would refuse it (MI_FAILURE)
  NOT_IN_NEGOTIATE = 5,
  BAD_ARGUMENT = 6,
};

enum Need { ANY, IN_EOM, IN_NEGOTIATE };

// A string (sent as UTF-8) or a Buffer (sent byte for byte) as C bytes.
bool GetBytes(const Napi::Value& v, std::string& out) {
  if (v.IsBuffer()) {
    Napi::Buffer<char> b = v.As<Napi::Buffer<char>>();
    out.assign(b.Data(), b.Length());
    return true;
  }
  if (v.IsString()) {
    out = v.As<Napi::String>().Utf8Value();
    return true;
  }
  return false;
}

// For values libmilter takes as C strings: no NUL inside.
bool GetCString(const Napi::Value& v, std::string& out) {
  return GetBytes(v, out) && memchr(out.data(), '\0', out.size()) == nullptr;
}

inline bool Absent(const Napi::Value& v) { return v.IsNull() || v.IsUndefined(); }

char* CStr(std::string& s) { return const_cast<char*>(s.c_str()); }

// Checks that the caller's callback is parked and the call is allowed there,
// then runs `fn` with the context under the session lock.
template <typename F>
int WithParked(const Napi::CallbackInfo& info, Need need, F&& fn) {
  Conn* c = UnwrapConn(info.Env(), info[0]);
  if (!c || !info[1].IsNumber()) return BAD_ARGUMENT;
  const uint32_t seq = info[1].As<Napi::Number>().Uint32Value();
  std::lock_guard<std::mutex> lk(c->mu);
  if (!c->ctx) return CLOSED;
  if (!c->waiting || c->answered || c->seq != seq) return NOT_PARKED;
  if (need == IN_EOM && c->waiting_type != EV_EOM) return NOT_IN_EOM;
  if (need == IN_NEGOTIATE && c->waiting_type != EV_NEGOTIATE) return NOT_IN_NEGOTIATE;
  return fn(c);
}

// Records a modification for the parked eom worker to write. `flag`: the
// action flag libmilter requires (0: none).
Napi::Value Record(const Napi::CallbackInfo& info, uint32_t flag, Action&& act) {
  const int code = WithParked(info, IN_EOM, [&](Conn* c) {
    if (flag && !(c->actions & flag)) return static_cast<int>(FAILURE);
    const bool now = act.type == ACT_PROGRESS;
    c->pending.push_back(std::move(act));
    if (now) {
      c->flush_now = true;
      c->cv.notify_one();
    }
    return static_cast<int>(OK);
  });
  return Napi::Number::New(info.Env(), code);
}

Napi::Value Code(const Napi::CallbackInfo& info, int code) { return Napi::Number::New(info.Env(), code); }

inline int FromMi(int mi) { return mi == MI_SUCCESS ? OK : FAILURE; }

// getsymval(conn, seq, name): the value (a Buffer when it holds 8-bit
// bytes), null when the MTA did not send it, undefined when libmilter
// cannot be asked now (the caller uses the macros captured with the event
// instead).
Napi::Value GetSymval(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Conn* c = UnwrapConn(env, info[0]);
  if (!c || !info[1].IsNumber() || !info[2].IsString()) return env.Undefined();
  const uint32_t seq = info[1].As<Napi::Number>().Uint32Value();
  std::string name = info[2].As<Napi::String>().Utf8Value();
  std::lock_guard<std::mutex> lk(c->mu);
  if (!c->ctx || !c->waiting || c->answered || c->seq != seq) return env.Undefined();
  if (!MacrosSafe(c->ctx)) return env.Null();  // a malformed macro list: read nothing
  const char* v = smfi_getsymval(c->ctx, CStr(name));
  if (!v) return env.Null();
  return Text(env, v, strlen(v));
}

// setreply(conn, seq, rcode, xcode|null, lines[])
Napi::Value SetReply(const Napi::CallbackInfo& info) {
  std::string rcode, xcode;
  bool has_x = !Absent(info[3]);
  if (!GetCString(info[2], rcode) || (has_x && !GetCString(info[3], xcode)) || !info[4].IsArray())
    return Code(info, BAD_ARGUMENT);
  Napi::Array arr = info[4].As<Napi::Array>();
  const uint32_t n = arr.Length();
  if (n > 32) return Code(info, BAD_ARGUMENT);
  std::vector<std::string> lines(n);
  for (uint32_t i = 0; i < n; i++)
    if (!GetCString(arr.Get(i), lines[i])) return Code(info, BAD_ARGUMENT);
  return Code(info, WithParked(info, ANY, [&](Conn* c) {
                char* x = has_x ? CStr(xcode) : nullptr;
                if (n <= 1) return FromMi(smfi_setreply(c->ctx, CStr(rcode), x, n ? CStr(lines[0]) : nullptr));
                const char* l[33] = {nullptr};
                for (uint32_t i = 0; i < n; i++) l[i] = lines[i].c_str();
                return FromMi(smfi_setmlreply(c->ctx, rcode.c_str(), x, l[0], l[1], l[2], l[3], l[4], l[5], l[6], l[7],
                                         l[8], l[9], l[10], l[11], l[12], l[13], l[14], l[15], l[16], l[17], l[18],
                                         l[19], l[20], l[21], l[22], l[23], l[24], l[25], l[26], l[27], l[28], l[29],
                                         l[30], l[31], nullptr));
              }));
}

// setsymlist(conn, seq, stage, "m1 m2 ...")
Napi::Value SetSymlist(const Napi::CallbackInfo& info) {
  std::string list;
  if (!info[2].IsNumber() || !GetCString(info[3], list)) return Code(info, BAD_ARGUMENT);
  const int stage = info[2].As<Napi::Number>().Int32Value();
  return Code(info, WithParked(info, IN_NEGOTIATE, [&](Conn* c) { return FromMi(smfi_setsymlist(c->ctx, stage, CStr(list))); }));
}

// addheader(conn, seq, name, value)
Napi::Value AddHeader(const Napi::CallbackInfo& info) {
  Action act{ACT_ADDHEADER};
  if (!GetCString(info[2], act.a) || !GetCString(info[3], act.b) || act.a.empty()) return Code(info, BAD_ARGUMENT);
  return Record(info, SMFIF_ADDHDRS, std::move(act));
}

// insheader(conn, seq, index, name, value)
Napi::Value InsHeader(const Napi::CallbackInfo& info) {
  Action act{ACT_INSHEADER};
  if (!info[2].IsNumber() || !GetCString(info[3], act.a) || !GetCString(info[4], act.b) || act.a.empty())
    return Code(info, BAD_ARGUMENT);
  act.index = info[2].As<Napi::Number>().Int32Value();
  return Record(info, SMFIF_ADDHDRS, std::move(act));
}

// chgheader(conn, seq, name, index, value|null)
Napi::Value ChgHeader(const Napi::CallbackInfo& info) {
  const bool del = Absent(info[4]);
  Action act{del ? ACT_DELHEADER : ACT_CHGHEADER};
  if (!GetCString(info[2], act.a) || !info[3].IsNumber() || (!del && !GetCString(info[4], act.b)) || act.a.empty())
    return Code(info, BAD_ARGUMENT);
  act.index = info[3].As<Napi::Number>().Int32Value();
  if (act.index < 0) return Code(info, BAD_ARGUMENT);
  return Record(info, SMFIF_CHGHDRS, std::move(act));
}

// addrcpt(conn, seq, rcpt, params|null)
Napi::Value AddRcpt(const Napi::CallbackInfo& info) {
  const bool has_params = !Absent(info[3]);
  Action act{has_params ? ACT_ADDRCPT_PAR : ACT_ADDRCPT};
  if (!GetCString(info[2], act.a) || (has_params && !GetCString(info[3], act.b)) || act.a.empty())
    return Code(info, BAD_ARGUMENT);
  return Record(info, has_params ? SMFIF_ADDRCPT_PAR : SMFIF_ADDRCPT, std::move(act));
}

// delrcpt(conn, seq, rcpt)
Napi::Value DelRcpt(const Napi::CallbackInfo& info) {
  Action act{ACT_DELRCPT};
  if (!GetCString(info[2], act.a) || act.a.empty()) return Code(info, BAD_ARGUMENT);
  return Record(info, SMFIF_DELRCPT, std::move(act));
}

// replacebody(conn, seq, chunk): the bytes are copied, JavaScript may reuse the Buffer.
Napi::Value ReplaceBody(const Napi::CallbackInfo& info) {
  if (!info[2].IsBuffer()) return Code(info, BAD_ARGUMENT);
  Napi::Buffer<char> b = info[2].As<Napi::Buffer<char>>();
  if (b.Length() > 0x7fffffff) return Code(info, BAD_ARGUMENT);
  Action act{ACT_REPLACEBODY};
  // Checked before the copy, so a refused call does not copy a large body.
  const int code = WithParked(info, IN_EOM, [&](Conn* c) {
    if (!(c->actions & SMFIF_CHGBODY)) return static_cast<int>(FAILURE);
    act.a.assign(b.Data(), b.Length());
    c->pending.push_back(std::move(act));
    return static_cast<int>(OK);
  });
  return Code(info, code);
}

// chgfrom(conn, seq, from, params|null)
Napi::Value ChgFrom(const Napi::CallbackInfo& info) {
  const bool has_params = !Absent(info[3]);
  Action act{has_params ? ACT_CHGFROM_PAR : ACT_CHGFROM};
  if (!GetCString(info[2], act.a) || (has_params && !GetCString(info[3], act.b)) || act.a.empty())
    return Code(info, BAD_ARGUMENT);
  return Record(info, SMFIF_CHGFROM, std::move(act));
}

// quarantine(conn, seq, reason)
Napi::Value Quarantine(const Napi::CallbackInfo& info) {
  Action act{ACT_QUARANTINE};
  if (!GetCString(info[2], act.a) || act.a.empty()) return Code(info, BAD_ARGUMENT);
  return Record(info, SMFIF_QUARANTINE, std::move(act));
}

// progress(conn, seq): written by the parked worker at once.
Napi::Value Progress(const Napi::CallbackInfo& info) { return Record(info, 0, Action{ACT_PROGRESS}); }

// negotiated(conn) -> [actions, steps, negotiated]
Napi::Value GetNegotiated(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Conn* c = UnwrapConn(env, info[0]);
  if (!c) return env.Undefined();
  Napi::Array out = Napi::Array::New(env, 3);
  std::lock_guard<std::mutex> lk(c->mu);
  out.Set(0u, Napi::Number::New(env, c->actions));
  out.Set(1u, Napi::Number::New(env, c->steps));
  out.Set(2u, Napi::Boolean::New(env, c->negotiated));
  return out;
}

const char* ActionName(ActionType t) {
  switch (t) {
    case ACT_ADDHEADER: return "addheader";
    case ACT_INSHEADER: return "insheader";
    case ACT_CHGHEADER:
    case ACT_DELHEADER: return "chgheader";
    case ACT_ADDRCPT:
    case ACT_ADDRCPT_PAR: return "addrcpt";
    case ACT_DELRCPT: return "delrcpt";
    case ACT_REPLACEBODY: return "replacebody";
    case ACT_CHGFROM:
    case ACT_CHGFROM_PAR: return "chgfrom";
    case ACT_QUARANTINE: return "quarantine";
    case ACT_PROGRESS: return "progress";
  }
  return "action";
}

int Write(SMFICTX* ctx, Action& act) {
  switch (act.type) {
    case ACT_ADDHEADER: return smfi_addheader(ctx, CStr(act.a), CStr(act.b));
    case ACT_INSHEADER: return smfi_insheader(ctx, act.index, CStr(act.a), CStr(act.b));
    case ACT_CHGHEADER: return smfi_chgheader(ctx, CStr(act.a), act.index, CStr(act.b));
    case ACT_DELHEADER: return smfi_chgheader(ctx, CStr(act.a), act.index, nullptr);
    case ACT_ADDRCPT: return smfi_addrcpt(ctx, CStr(act.a));
    case ACT_ADDRCPT_PAR: return smfi_addrcpt_par(ctx, CStr(act.a), CStr(act.b));
    case ACT_DELRCPT: return smfi_delrcpt(ctx, CStr(act.a));
    // libmilter splits a large body into protocol-sized chunks itself.
    case ACT_REPLACEBODY:
      return smfi_replacebody(ctx, reinterpret_cast<unsigned char*>(CStr(act.a)), static_cast<int>(act.a.size()));
    case ACT_CHGFROM: return smfi_chgfrom(ctx, CStr(act.a), nullptr);
    case ACT_CHGFROM_PAR: return smfi_chgfrom(ctx, CStr(act.a), CStr(act.b));
    case ACT_QUARANTINE: return smfi_quarantine(ctx, CStr(act.a));
    case ACT_PROGRESS: {
      const int r = smfi_progress(ctx);
      if (r == MI_SUCCESS) State().progress_sent.fetch_add(1);
      return r;
    }
  }
  return MI_FAILURE;
}

}  // namespace

bool WriteActions(Conn* c, SMFICTX* ctx, uint32_t seq, std::vector<Action>& actions) {
  for (size_t i = 0; i < actions.size(); i++) {
    errno = 0;
    if (Write(ctx, actions[i]) == MI_SUCCESS) continue;
    // The MTA connection failed (or timed out): the rest would fail the same
    // way, each after its own wait.
    Addon& a = State();
    a.actions_failed.fetch_add(1);
    Event* ev = new Event();
    ev->type = EV_ACTION_FAILED;
    ev->conn = c;
    ev->conn_id = c->id;
    ev->n0 = actions.size() - i - 1;
    ev->strs.emplace_back(ActionName(actions[i].type));
    ev->strs.emplace_back(errno ? strerror(errno) : "libmilter could not write to the MTA");
    ev->n1 = seq;
    Enqueue(ev);
    return false;
  }
  return true;
}

// The tag that marks Externals made by WrapConn: any other External (from
// another addon, or a forged one) is refused instead of read as a Conn.
static const napi_type_tag kConnTag = {0x6e6f64656d696c74ULL, 0x6572436f6e6e0001ULL};

Napi::Value WrapConn(Napi::Env env, Conn* c) {
  Napi::External<Conn> ext = Napi::External<Conn>::New(env, c, [](Napi::Env, Conn* p) { ConnUnref(p); });
  napi_type_tag_object(env, ext, &kConnTag);
  return ext;
}

Conn* UnwrapConn(Napi::Env env, const Napi::Value& v) {
  if (!v.IsExternal()) return nullptr;
  bool ok = false;
  if (napi_check_object_type_tag(env, v, &kConnTag, &ok) != napi_ok || !ok) return nullptr;
  return v.As<Napi::External<Conn>>().Data();
}

void InitContext(Napi::Env env, Napi::Object exports) {
  exports.Set("getsymval", Napi::Function::New(env, GetSymval, "getsymval"));
  exports.Set("setreply", Napi::Function::New(env, SetReply, "setreply"));
  exports.Set("setsymlist", Napi::Function::New(env, SetSymlist, "setsymlist"));
  exports.Set("addheader", Napi::Function::New(env, AddHeader, "addheader"));
  exports.Set("insheader", Napi::Function::New(env, InsHeader, "insheader"));
  exports.Set("chgheader", Napi::Function::New(env, ChgHeader, "chgheader"));
  exports.Set("addrcpt", Napi::Function::New(env, AddRcpt, "addrcpt"));
  exports.Set("delrcpt", Napi::Function::New(env, DelRcpt, "delrcpt"));
  exports.Set("replacebody", Napi::Function::New(env, ReplaceBody, "replacebody"));
  exports.Set("chgfrom", Napi::Function::New(env, ChgFrom, "chgfrom"));
  exports.Set("quarantine", Napi::Function::New(env, Quarantine, "quarantine"));
  exports.Set("progress", Napi::Function::New(env, Progress, "progress"));
  exports.Set("negotiated", Napi::Function::New(env, GetNegotiated, "negotiated"));
}

}  // namespace nodemilter
