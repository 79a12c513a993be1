/**
 * Method decorators for {@link Base} subclasses: `@noreply`, `@nocallback`,
 * `@symlist(...)` and `@decode(...)`. They are standard (TC39) decorators:
 * TypeScript 5 with `experimentalDecorators` off compiles them for Node 20.
 * Each one only records a fact about the method (nothing is wrapped);
 * {@link describe} reads those facts from the class when it builds the
 * milter's description, so a subclass that overrides a method starts afresh.
 *
 * Where decorator syntax is not available (plain JavaScript on Node 20, or a
 * transpiler that does not lower standard decorators), {@link decorate}
 * applies the same decorators by name.
 *
 * @module
 */
import type { Decoding } from './types';
import { InvalidArgumentError } from './errors';

/** What the decorators recorded about one method. */
export interface MethodTags {
  readonly noreply?: boolean;
  readonly nocallback?: boolean;
  readonly symlist?: readonly string[];
  readonly decode?: Decoding;
}

const TAGS = new WeakMap<Function, MethodTags>();

/**
 * What the decorators recorded about a method function (an empty object for
 * an undecorated one). Used by {@link describe}; handy in tests.
 */
export function methodTags(fn: unknown): MethodTags {
  return (typeof fn === 'function' && TAGS.get(fn)) || NO_TAGS;
}

/** The tags of an undecorated method: one shared, frozen object (methodTags runs for every event). */
const NO_TAGS: MethodTags = Object.freeze({});

function tag(fn: Function, tags: MethodTags): void {
  TAGS.set(fn, { ...TAGS.get(fn), ...tags });
}

/** Base methods whose step the MTA can skip (`@noreply`, `@nocallback`). */
export const OPTIONAL_METHODS = ['connect', 'hello', 'envfrom', 'envrcpt', 'data', 'header', 'eoh', 'body', 'unknown'] as const;
/** Base methods that have a macro stage (`@symlist`). */
export const SYMLIST_METHODS = ['connect', 'hello', 'envfrom', 'envrcpt', 'data', 'eoh', 'eom'] as const;
/** Base methods whose string arguments may arrive as Buffers (`@decode`). */
export const DECODABLE_METHODS = ['connect', 'hello', 'envfrom', 'envrcpt', 'header', 'unknown'] as const;

/** The shape of a standard method decorator, as {@link decorate} takes it. */
export type MethodDecorator = (method: any, context: ClassMethodDecoratorContext<any, any>) => unknown;

function methodName(decorator: string, context: ClassMethodDecoratorContext, allowed: readonly string[]): string {
  if (context.kind !== 'method' || context.static || context.private || typeof context.name !== 'string') {
    throw new InvalidArgumentError(`@${decorator} applies to public instance methods, not to ${String(context.name)}`);
  }
  if (!allowed.includes(context.name)) {
    throw new InvalidArgumentError(`@${decorator} cannot apply to ${context.name}(): expected one of ${allowed.join(', ')}`);
  }
  return context.name;
}

/**
 * The MTA does not wait for this callback's answer (SMFIP_NR_*): it goes on
 * at once as if CONTINUE were returned. The method still runs, in order with
 * the connection's other callbacks, and should return CONTINUE; any other
 * status is reported to the logger as an error and ignored.
 *
 * @example
 * ```ts
 * class Counter extends Base {
 *   headers = 0;
 *   @noreply
 *   override header(name: string, value: string) {
 *     this.headers++;
 *     return CONTINUE;
 *   }
 * }
 * ```
 */
export function noreply(method: Function, context: ClassMethodDecoratorContext): void {
  methodName('noreply', context, OPTIONAL_METHODS);
  tag(method, { noreply: true });
}

/**
 * Negotiate this step away (SMFIP_NO*) although the method is defined, so
 * the MTA never sends the event. Useful when extending a milter class whose
 * callback you do not want. A method that is not overridden at all is
 * negotiated away without this decorator.
 */
export function nocallback(method: Function, context: ClassMethodDecoratorContext): void {
  methodName('nocallback', context, OPTIONAL_METHODS);
  tag(method, { nocallback: true });
}

/**
 * Ask the MTA to send exactly these macros at this method's stage
 * (smfi_setsymlist at negotiation). Names may be given separately or
 * space-separated; braces are kept as written (`'{auth_authen}'`).
 * Applies to connect, hello, envfrom, envrcpt, data, eoh and eom. The MTA
 * must offer SMFIF_SETSYMLIST; Postfix also needs the macros in its
 * `milter_*_macros` settings.
 *
 * @example
 * ```ts
 * class Auth extends Base {
 *   @symlist('{auth_authen}', '{mail_addr}')
 *   override envfrom(from: string) {
 *     return this.getsymval('{auth_authen}') ? ACCEPT : CONTINUE;
 *   }
 * }
 * ```
 */
export function symlist(...macros: string[]) {
  const names = macros.flatMap((m) => String(m).split(/\s+/)).filter((m) => m.length > 0);
  if (names.length === 0) throw new InvalidArgumentError('@symlist needs at least one macro name');
  return function (method: Function, context: ClassMethodDecoratorContext): void {
    methodName('symlist', context, SYMLIST_METHODS);
    tag(method, { symlist: names });
  };
}

/**
 * Choose how this method's values arrive: `'string'` (the default, UTF-8
 * decoded) or `'bytes'` (Buffers, byte for byte, for 8-bit headers or
 * addresses that are not UTF-8). Applies to connect (hostname), hello,
 * envfrom, envrcpt (all arguments), header (the value) and unknown.
 *
 * @example
 * ```ts
 * class Raw extends Base {
 *   @decode('bytes')
 *   override header(name: string, value: Buffer) { return CONTINUE; }
 * }
 * ```
 */
export function decode(decoding: Decoding) {
  if (decoding !== 'string' && decoding !== 'bytes') {
    throw new InvalidArgumentError(`@decode(${JSON.stringify(decoding)}) is invalid: expected 'string' or 'bytes'`);
  }
  return function (method: Function, context: ClassMethodDecoratorContext): void {
    methodName('decode', context, DECODABLE_METHODS);
    tag(method, { decode: decoding });
  };
}

/**
 * Apply method decorators without decorator syntax, for plain JavaScript or
 * a toolchain that does not compile standard decorators. The method must be
 * defined by `cls` itself (not inherited). Decorators apply in the same
 * order as when written above the method: the last one first.
 *
 * @example
 * ```js
 * class Counter extends Base {
 *   header(name, value) { return CONTINUE; }
 * }
 * decorate(Counter, 'header', noreply, decode('bytes'));
 * ```
 */
export function decorate(cls: abstract new (...args: any[]) => unknown, name: string, ...decorators: MethodDecorator[]): void {
  const proto = cls.prototype as Record<string, unknown>;
  if (!Object.prototype.hasOwnProperty.call(proto, name) || typeof proto[name] !== 'function') {
    throw new InvalidArgumentError(`decorate: ${cls.name} does not define a method ${JSON.stringify(name)} itself`);
  }
  let fn = proto[name] as Function;
  const context = {
    kind: 'method',
    name,
    static: false,
    private: false,
    metadata: undefined,
    access: { has: (o: object) => name in o, get: (o: any) => o[name] },
    addInitializer() {},
  } as unknown as ClassMethodDecoratorContext;
  for (const decorator of [...decorators].reverse()) {
    const replaced = decorator(fn, context);
    if (typeof replaced === 'function') fn = replaced;
  }
  if (fn !== proto[name]) Object.defineProperty(proto, name, { value: fn, writable: true, configurable: true, enumerable: false });
}
