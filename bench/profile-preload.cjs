// Preloaded into a Node milter by bench/profile.cjs (NODE_OPTIONS=--require):
// starts V8's CPU profiler when the process starts and, on SIGUSR2, stops it,
// writes the profile to $NODEMILTER_CPU_PROFILE (the .cpuprofile format that
// Chrome DevTools and `node --cpu-prof` use) and exits. The benchmark stops
// its milters with SIGKILL, on which `node --cpu-prof` would write nothing.
'use strict';
const inspector = require('node:inspector');
const fs = require('node:fs');

const out = process.env.NODEMILTER_CPU_PROFILE;
if (!out) throw new Error('bench/profile-preload.cjs: NODEMILTER_CPU_PROFILE (the file to write) is not set');
const intervalUs = Number(process.env.NODEMILTER_CPU_PROFILE_INTERVAL_US || 100);

const session = new inspector.Session();
session.connect();
session.post('Profiler.enable');
session.post('Profiler.setSamplingInterval', { interval: intervalUs });
session.post('Profiler.start');

process.on('SIGUSR2', () => {
  session.post('Profiler.stop', (err, res) => {
    if (err) {
      process.stderr.write(`bench/profile-preload.cjs: the profiler did not stop: ${err.message}\n`);
      process.exit(1);
    }
    const tmp = `${out}.${process.pid}.tmp`;
    fs.writeFileSync(tmp, JSON.stringify(res.profile));
    fs.renameSync(tmp, out);
    process.exit(0);
  });
});
