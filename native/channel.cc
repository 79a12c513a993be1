// The channel from libmilter's threads to JavaScript: one process-wide
// queue of events, and the thread-safe function that wakes the JavaScript
// thread for it. The first event into an empty queue wakes the event loop,
// which then drains the whole queue in one go (many events per wake-up).
// No-reply events are counted in bytes while queued; past the marks in
// engine.h the worker that queues waits (the bound on queued memory).

#include <chrono>

#include "engine.h"

namespace nodemilter {

namespace {

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

// Wakes the workers answered during a round of events (see
// Addon::answered_in_round), in the order they were answered.
void WakeAnswered(Addon& a) {
  for (Conn* c : a.answered_in_round) {
    c->cv.notify_one();
    ConnUnref(c);
  }
  a.answered_in_round.clear();
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
    a.delivering = true;
    for (Event* ev : batch) {
      if (ev->type == EV_STOPPED) stopped = true;
      if (a.closing.load()) Drop(ev);
      else {
        DeliverOne(env, fn, ev);
        delete ev;
      }
    }
    a.delivering = false;
    WakeAnswered(a);
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

}  // namespace

void InitChannel(Napi::Env env, Napi::Object exports) {
  exports.Set("openChannel", Napi::Function::New(env, OpenChannel, "openChannel"));
  exports.Set("refChannel", Napi::Function::New(env, RefChannel, "refChannel"));
}

}  // namespace nodemilter
