/**
 * What the supervisor and its workers say to each other: the worker's
 * environment variable, and the messages on the IPC channel.
 *
 * @internal
 * @module
 */
import { InvalidArgumentError } from '../errors';
import type { MetricsSnapshot } from '../metrics';
import type { DrainMode } from './engine';

/** The environment variable that makes a runmilter call a worker of a supervisor. */
export const WORKER_ENV = 'NODEMILTER_WORKER';

/** The descriptor a worker finds the listening socket on. */
export const WORKER_FD = 3;

/** What the supervisor tells a worker in {@link WORKER_ENV} (JSON). */
export interface WorkerInfo {
  /** The worker's slot, 1..N. */
  id: number;
  /** Which start (or reload) of workers it belongs to, from 1. */
  generation: number;
  /** The engine the supervisor resolved (`'auto'` decided once, there). */
  engine: 'libmilter' | 'node';
  /** The socket as the user gave it, for the log. */
  socket: string;
  /** Whether the worker keeps metrics for the supervisor to merge. */
  metrics: boolean;
}

/** Supervisor to worker. */
export type ToWorker =
  | { type: 'stop'; mode: DrainMode; reason: string }
  | { type: 'metrics'; seq: number };

/** Worker to supervisor. */
export type FromWorker =
  | { type: 'ready'; pid: number }
  | { type: 'metrics'; seq: number; snapshot: MetricsSnapshot | undefined }
  | { type: 'stopped'; snapshot: MetricsSnapshot | undefined };

/** This process's worker information, or undefined when it is not a supervisor's worker. */
export function workerInfo(): WorkerInfo | undefined {
  const raw = process.env[WORKER_ENV];
  if (!raw) return undefined;
  let info: WorkerInfo;
  try {
    info = JSON.parse(raw) as WorkerInfo;
  } catch {
    throw new InvalidArgumentError(`${WORKER_ENV} must be the JSON the supervisor sets, got ${JSON.stringify(raw.slice(0, 80))}`);
  }
  if (!info || !Number.isInteger(info.id) || (info.engine !== 'libmilter' && info.engine !== 'node') || typeof process.send !== 'function') {
    throw new InvalidArgumentError(`${WORKER_ENV} is set (${raw.slice(0, 80)}) but this process is not a worker started by a runmilter supervisor`);
  }
  return info;
}
