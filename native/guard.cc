// The libmilter layout guard: keeps smfi_getsymval from walking past a
// malformed macro list (see below), and its check of libmilter's context
// layout against sendmail 8.14+'s struct smfi_str.

#include <cstddef>
#include <cstring>
#include <ctime>

#include "engine.h"

// Defined only by a libmilter built with native/libmilter/odd-macros.patch
// (scripts/build-libmilter.sh, linked into the prebuild): that libmilter
// itself drops a trailing macro name without a value, so smfi_getsymval
// cannot walk past a list and the guard is not needed. Weak: with any other
// libmilter its address is null.
extern "C" {
extern const int mi_macros_paired __attribute__((weak));
}

namespace nodemilter {

namespace {

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
// Trivially destructible or never destroyed: a worker may calibrate during exit().
std::atomic<int> g_stages{-2};
std::mutex g_calmu;
std::string& GuardProblem() {
  static std::string* why = new std::string();
  return *why;
}

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

bool PatchedLibmilter() { return &mi_macros_paired != nullptr && mi_macros_paired == 1; }

std::string MacroGuardProblem() {
  std::lock_guard<std::mutex> lk(g_calmu);
  return GuardProblem();
}

bool MacrosSafe(SMFICTX* ctx) {
  if (ctx == nullptr) return false;
  if (PatchedLibmilter()) return true;  // libmilter keeps its lists in pairs itself
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
          GuardProblem() = why;
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

}  // namespace nodemilter
