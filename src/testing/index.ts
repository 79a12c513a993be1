/**
 * Testing tools: an MTA-side milter protocol client to drive any milter.
 *
 * @module
 */
export * from './client';
export * from './testctx';
export * from './apply';
