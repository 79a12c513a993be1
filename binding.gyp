{
  "targets": [
    {
      "target_name": "nodemilter",
      "sources": [
        "native/addon.cc",
        "native/channel.cc",
        "native/context.cc",
        "native/crash.cc",
        "native/dispatch.cc",
        "native/guard.cc",
        "native/listener.cc",
        "native/marshal.cc"
      ],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NAPI_DISABLE_CPP_EXCEPTIONS", "NODE_ADDON_API_DISABLE_DEPRECATED"],
      "cflags_cc": ["-std=c++17", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
      "conditions": [
        ["'<!(node -p \"process.env.NODEMILTER_STATIC || 0\")'=='1'", {
          "libraries": ["<!(node -p \"process.env.NODEMILTER_LIBMILTER_A || '-l:libmilter.a'\")", "-lpthread", "-ldl"]
        }, {
          "libraries": ["-lmilter", "-lpthread", "-ldl"]
        }],
        ["'<!(node -p \"process.env.NODEMILTER_SANITIZE || 0\")'=='1'", {
          "cflags_cc": ["-fsanitize=address,undefined", "-fsanitize-recover=address", "-fno-omit-frame-pointer", "-g", "-O1"],
          "ldflags": ["-fsanitize=address,undefined", "-fsanitize-recover=address"]
        }]
      ]
    }
  ]
}
