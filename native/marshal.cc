// Events into JavaScript values: one call of the event handler per event.
// Runs on the JavaScript thread only.

#include "engine.h"

namespace nodemilter {

// ASCII arrives as a string (the common case, and cheap); anything with
// 8-bit bytes arrives as a Buffer so nothing is lost on the way. The
// TypeScript layer decodes according to what the callback asked for.
Napi::Value Text(Napi::Env env, const char* s, size_t len) {
  for (size_t i = 0; i < len; i++) {
    if (static_cast<unsigned char>(s[i]) >= 0x80) return Napi::Buffer<char>::Copy(env, s, len);
  }
  napi_value v;
  napi_create_string_latin1(env, s, len, &v);
  return Napi::Value(env, v);
}


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

}  // namespace nodemilter
