// Module entry point of the nodemilter addon: one process-wide libmilter.

#include "engine.h"

namespace nodemilter {

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  InitCrash(env, exports);  // first: a fault in the rest of Init is reported
  InitListener(env, exports);
  InitDispatch(env, exports);
  InitChannel(env, exports);
  InitContext(env, exports);
  return exports;
}

}  // namespace nodemilter

static Napi::Object InitAddon(Napi::Env env, Napi::Object exports) { return nodemilter::Init(env, exports); }

NODE_API_MODULE(nodemilter, InitAddon)
