// The per-session actions JavaScript may call (smfi_setreply, smfi_addheader,
// ...). libmilter's modification calls write to the session socket without
// locking, so each one here runs only while that session's libmilter thread
// is parked waiting for JavaScript in the very callback (seq) the caller
// belongs to, and holds the session lock so the thread cannot time out and
// leave in the middle. Each returns a code the TypeScript layer turns into a
// typed error; validation of the values themselves happens there.

#include <cstring>

#include "engine.h"

namespace nodemilter {

namespace {

enum ActionCode {
  OK = 0,
  CLOSED = 1,      // libmilter has closed the session
  NOT_PARKED = 2,  // the callback this call belongs to has already been answered
  NOT_IN_EOM = 3,  // a modification outside end of message
  FAILURE = 4,     // libmilter returned MI_FAILURE
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

char* C(std::string& s) { return const_cast<char*>(s.c_str()); }

template <typename F>
Napi::Value Act(const Napi::CallbackInfo& info, Need need, F&& fn) {
  Napi::Env env = info.Env();
  Conn* c = UnwrapConn(info[0]);
  if (!c || !info[1].IsNumber()) return Napi::Number::New(env, BAD_ARGUMENT);
  const uint32_t seq = info[1].As<Napi::Number>().Uint32Value();
  std::lock_guard<std::mutex> lk(c->mu);
  int code = OK;
  if (!c->ctx) code = CLOSED;
  else if (!c->waiting || c->answered || c->seq != seq) code = NOT_PARKED;
  else if (need == IN_EOM && c->waiting_type != EV_EOM) code = NOT_IN_EOM;
  else if (need == IN_NEGOTIATE && c->waiting_type != EV_NEGOTIATE) code = NOT_IN_NEGOTIATE;
  else code = fn(c->ctx);
  return Napi::Number::New(env, code);
}

inline int R(int mi) { return mi == MI_SUCCESS ? OK : FAILURE; }

// getsymval(conn, seq, name): the value, null when the MTA did not send it,
// undefined when libmilter cannot be asked now (the caller uses the macros
// captured with the event instead).
Napi::Value GetSymval(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Conn* c = UnwrapConn(info[0]);
  if (!c || !info[1].IsNumber() || !info[2].IsString()) return env.Undefined();
  const uint32_t seq = info[1].As<Napi::Number>().Uint32Value();
  std::string name = info[2].As<Napi::String>().Utf8Value();
  std::lock_guard<std::mutex> lk(c->mu);
  if (!c->ctx || !c->waiting || c->answered || c->seq != seq) return env.Undefined();
  if (!MacrosSafe(c->ctx)) return env.Null();  // a malformed macro list: read nothing
  const char* v = smfi_getsymval(c->ctx, C(name));
  if (!v) return env.Null();
  return Napi::String::New(env, v);
}

// setreply(conn, seq, rcode, xcode|null, lines[])
Napi::Value SetReply(const Napi::CallbackInfo& info) {
  std::string rcode, xcode;
  bool has_x = !info[3].IsNull() && !info[3].IsUndefined();
  if (!GetCString(info[2], rcode) || (has_x && !GetCString(info[3], xcode)) || !info[4].IsArray())
    return Napi::Number::New(info.Env(), BAD_ARGUMENT);
  Napi::Array arr = info[4].As<Napi::Array>();
  const uint32_t n = arr.Length();
  if (n > 32) return Napi::Number::New(info.Env(), BAD_ARGUMENT);
  std::vector<std::string> lines(n);
  for (uint32_t i = 0; i < n; i++)
    if (!GetCString(arr.Get(i), lines[i])) return Napi::Number::New(info.Env(), BAD_ARGUMENT);
  return Act(info, ANY, [&](SMFICTX* ctx) {
    char* x = has_x ? C(xcode) : nullptr;
    if (n <= 1) return R(smfi_setreply(ctx, C(rcode), x, n ? C(lines[0]) : nullptr));
    const char* l[33] = {nullptr};
    for (uint32_t i = 0; i < n; i++) l[i] = lines[i].c_str();
    return R(smfi_setmlreply(ctx, rcode.c_str(), x, l[0], l[1], l[2], l[3], l[4], l[5], l[6], l[7], l[8], l[9],
                             l[10], l[11], l[12], l[13], l[14], l[15], l[16], l[17], l[18], l[19], l[20], l[21],
                             l[22], l[23], l[24], l[25], l[26], l[27], l[28], l[29], l[30], l[31], nullptr));
  });
}

// setsymlist(conn, seq, stage, "m1 m2 ...")
Napi::Value SetSymlist(const Napi::CallbackInfo& info) {
  std::string list;
  if (!info[2].IsNumber() || !GetCString(info[3], list)) return Napi::Number::New(info.Env(), BAD_ARGUMENT);
  const int stage = info[2].As<Napi::Number>().Int32Value();
  return Act(info, IN_NEGOTIATE, [&](SMFICTX* ctx) { return R(smfi_setsymlist(ctx, stage, C(list))); });
}

// addheader(conn, seq, name, value)
Napi::Value AddHeader(const Napi::CallbackInfo& info) {
  std::string name, value;
  if (!GetCString(info[2], name) || !GetCString(info[3], value)) return Napi::Number::New(info.Env(), BAD_ARGUMENT);
  return Act(info, IN_EOM, [&](SMFICTX* ctx) { return R(smfi_addheader(ctx, C(name), C(value))); });
}

// insheader(conn, seq, index, name, value)
Napi::Value InsHeader(const Napi::CallbackInfo& info) {
  std::string name, value;
  if (!info[2].IsNumber() || !GetCString(info[3], name) || !GetCString(info[4], value))
    return Napi::Number::New(info.Env(), BAD_ARGUMENT);
  const int index = info[2].As<Napi::Number>().Int32Value();
  return Act(info, IN_EOM, [&](SMFICTX* ctx) { return R(smfi_insheader(ctx, index, C(name), C(value))); });
}

// chgheader(conn, seq, name, index, value|null)
Napi::Value ChgHeader(const Napi::CallbackInfo& info) {
  std::string name, value;
  const bool del = info[4].IsNull() || info[4].IsUndefined();
  if (!GetCString(info[2], name) || !info[3].IsNumber() || (!del && !GetCString(info[4], value)))
    return Napi::Number::New(info.Env(), BAD_ARGUMENT);
  const int index = info[3].As<Napi::Number>().Int32Value();
  return Act(info, IN_EOM,
             [&](SMFICTX* ctx) { return R(smfi_chgheader(ctx, C(name), index, del ? nullptr : C(value))); });
}

// addrcpt(conn, seq, rcpt, params|null)
Napi::Value AddRcpt(const Napi::CallbackInfo& info) {
  std::string rcpt, params;
  const bool has_params = !info[3].IsNull() && !info[3].IsUndefined();
  if (!GetCString(info[2], rcpt) || (has_params && !GetCString(info[3], params)))
    return Napi::Number::New(info.Env(), BAD_ARGUMENT);
  return Act(info, IN_EOM, [&](SMFICTX* ctx) {
    return has_params ? R(smfi_addrcpt_par(ctx, C(rcpt), C(params))) : R(smfi_addrcpt(ctx, C(rcpt)));
  });
}

// delrcpt(conn, seq, rcpt)
Napi::Value DelRcpt(const Napi::CallbackInfo& info) {
  std::string rcpt;
  if (!GetCString(info[2], rcpt)) return Napi::Number::New(info.Env(), BAD_ARGUMENT);
  return Act(info, IN_EOM, [&](SMFICTX* ctx) { return R(smfi_delrcpt(ctx, C(rcpt))); });
}

// replacebody(conn, seq, chunk)
Napi::Value ReplaceBody(const Napi::CallbackInfo& info) {
  if (!info[2].IsBuffer()) return Napi::Number::New(info.Env(), BAD_ARGUMENT);
  Napi::Buffer<unsigned char> b = info[2].As<Napi::Buffer<unsigned char>>();
  if (b.Length() > 0x7fffffff) return Napi::Number::New(info.Env(), BAD_ARGUMENT);
  return Act(info, IN_EOM, [&](SMFICTX* ctx) {
    // libmilter splits a large body into protocol-sized chunks itself.
    return R(smfi_replacebody(ctx, b.Data(), static_cast<int>(b.Length())));
  });
}

// chgfrom(conn, seq, from, params|null)
Napi::Value ChgFrom(const Napi::CallbackInfo& info) {
  std::string from, params;
  const bool has_params = !info[3].IsNull() && !info[3].IsUndefined();
  if (!GetCString(info[2], from) || (has_params && !GetCString(info[3], params)))
    return Napi::Number::New(info.Env(), BAD_ARGUMENT);
  return Act(info, IN_EOM,
             [&](SMFICTX* ctx) { return R(smfi_chgfrom(ctx, C(from), has_params ? C(params) : nullptr)); });
}

// quarantine(conn, seq, reason)
Napi::Value Quarantine(const Napi::CallbackInfo& info) {
  std::string reason;
  if (!GetCString(info[2], reason)) return Napi::Number::New(info.Env(), BAD_ARGUMENT);
  return Act(info, IN_EOM, [&](SMFICTX* ctx) { return R(smfi_quarantine(ctx, C(reason))); });
}

// progress(conn, seq)
Napi::Value Progress(const Napi::CallbackInfo& info) {
  return Act(info, IN_EOM, [&](SMFICTX* ctx) {
    State().progress_sent.fetch_add(1);
    return R(smfi_progress(ctx));
  });
}

// negotiated(conn) -> [actions, steps, negotiated]
Napi::Value Negotiated(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Conn* c = UnwrapConn(info[0]);
  Napi::Array out = Napi::Array::New(env, 3);
  if (!c) return env.Undefined();
  std::lock_guard<std::mutex> lk(c->mu);
  out.Set(0u, Napi::Number::New(env, c->actions));
  out.Set(1u, Napi::Number::New(env, c->steps));
  out.Set(2u, Napi::Boolean::New(env, c->negotiated));
  return out;
}

}  // namespace

Conn* UnwrapConn(const Napi::Value& v) {
  if (!v.IsExternal()) return nullptr;
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
  exports.Set("negotiated", Napi::Function::New(env, Negotiated, "negotiated"));
}

}  // namespace nodemilter
