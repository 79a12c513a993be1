/**
 * Testing tools: an MTA-side milter protocol client to drive any milter.
 *
 * @module nodemilter/testing
 */
export * from './client';
export * from './testctx';
export * from './apply';
