import { describe as suite, it, expect } from 'vitest';
import {
  validateReply, validateHeaderName, validateHeaderValue, validateHeaderIndex, validateEnvelope, normalizeSymlist,
  validateQuarantineReason, checkStatus, InvalidReplyError, InvalidArgumentError, InvalidStatusError,
  CONTINUE, REJECT, SKIP, NOREPLY, ALL_OPTS, TEMPFAIL, P_SKIP, P_NR_HDR, P_NR_BODY, M_ENVFROM,
} from '../src/index';

suite('validateReply', () => {
  it.each([
    ['550', '5.7.1', ['Go away']],
    ['451', '4.3.0', ['Try later']],
    ['554', null, ['no xcode']],
    ['554', undefined, []],
    ['554', '', ['empty xcode means none']],
    ['550', '5.1.1', ['100%% sure', '%%%% is fine']],
    ['550', '5.123.999', ['x']],
    ['550', '5.7.1', Array.from({ length: 32 }, (_, i) => `line ${i}`)],
  ] as const)('accepts %s %s %j', (rcode, xcode, lines) => {
    const r = validateReply(rcode, xcode, lines);
    expect(r.rcode).toBe(rcode);
    expect(r.xcode).toBe(xcode ? xcode : null);
    expect(r.lines).toEqual(lines);
  });

  it.each([
    ['250', null, [], /reply code "250" is invalid: expected three digits starting with 4 or 5/],
    ['55', null, [], /reply code "55" is invalid/],
    ['5500', null, [], /reply code "5500"/],
    ['abc', null, [], /reply code "abc"/],
    ['550', '5.7', [], /extended code "5.7" is invalid: expected class.subject.detail/],
    ['550', '5.7.1000', [], /extended code "5.7.1000" is invalid/],
    ['550', '6.7.1', [], /extended code "6.7.1" is invalid/],
    ['550', '4.7.1', [], /extended code "4.7.1" does not match reply code "550": its first digit must be 5/],
    ['451', '2.0.0', [], /extended code "2.0.0" does not match reply code "451"/],
    ['550', '5.7.1', ['two\r\nlines'], /reply text "two\\r\\nlines" contains CR, LF or NUL/],
    ['550', '5.7.1', ['a', 'b\nc'], /reply line 2 "b\\nc" contains CR, LF or NUL/],
    ['550', '5.7.1', ['nul\0'], /contains CR, LF or NUL/],
    ['550', '5.7.1', ['100% sure'], /reply text "100% sure" has a lone "%": libmilter needs every "%" doubled/],
    ['550', '5.7.1', ['%%% odd'], /lone "%"/],
    ['550', '5.7.1', Array.from({ length: 33 }, () => 'x'), /reply has 33 lines: at most 32/],
    ['550', '5.7.1', ['x'.repeat(971)], /reply text is 981 bytes with its codes: at most 980/],
  ] as const)('rejects %s %s %j', (rcode, xcode, lines, message) => {
    expect(() => validateReply(rcode, xcode, lines)).toThrow(InvalidReplyError);
    expect(() => validateReply(rcode, xcode, lines)).toThrow(message);
  });

  it('counts bytes, codes included, against 980', () => {
    expect(() => validateReply('550', '5.7.1', ['x'.repeat(970)])).not.toThrow();
    expect(() => validateReply('550', null, ['x'.repeat(976)])).not.toThrow();
    expect(() => validateReply('550', null, ['x'.repeat(977)])).toThrow(/981 bytes/);
    expect(() => validateReply('550', null, ['é'.repeat(489)])).toThrow(/982 bytes/);
  });

  it('errors carry a stable code', () => {
    try {
      validateReply('200', null, []);
      expect.unreachable();
    } catch (e: any) {
      expect(e.code).toBe('ERR_MILTER_INVALID_REPLY');
    }
  });
});

suite('headers', () => {
  it.each(['Subject', 'X-Spam-Score', 'x_y.z', '!#$%&'])('accepts the name %j', (name) => {
    expect(() => validateHeaderName(name)).not.toThrow();
  });
  it.each([
    ['', /expected a non-empty string/],
    ['X Spam', /"X Spam" is invalid: expected printable ASCII without ":", spaces or control characters/],
    ['X:Y', /"X:Y" is invalid/],
    ['X\tY', /is invalid/],
    ['X\u0001', /is invalid/],
    ['Sübject', /is invalid/],
  ])('rejects the name %j', (name, message) => {
    expect(() => validateHeaderName(name)).toThrow(InvalidArgumentError);
    expect(() => validateHeaderName(name)).toThrow(message);
  });

  it('values: folded text and 8-bit bytes pass, NUL does not', () => {
    expect(() => validateHeaderValue('S', 'line one\n\tline two')).not.toThrow();
    expect(() => validateHeaderValue('S', Buffer.from([0xe9, 0x41]))).not.toThrow();
    expect(() => validateHeaderValue('S', 'a\0b')).toThrow(/value of header "S" contains NUL/);
    expect(() => validateHeaderValue('S', Buffer.from([0x41, 0]))).toThrow(/contains NUL/);
    expect(() => validateHeaderValue('S', 42 as any)).toThrow(/expected a string or Buffer/);
  });

  it('values: CRLF folding is sent as LF (Postfix and sendmail would deliver a bare CR); a bare CR or an unindented line is refused', () => {
    const plain = 'no folding';
    expect(validateHeaderValue('S', plain)).toBe(plain);
    const lf = Buffer.from('one\n\ttwo');
    expect(validateHeaderValue('S', lf)).toBe(lf); // unchanged: the same object
    expect(validateHeaderValue('S', 'one\r\n\ttwo\r\n three')).toBe('one\n\ttwo\n three');
    const b = validateHeaderValue('S', Buffer.from('caf\xe9\r\n\tx', 'latin1'));
    expect(Buffer.isBuffer(b) && b.toString('latin1')).toBe('caf\xe9\n\tx');
    expect(() => validateHeaderValue('S', 'a\rb')).toThrow(/value of header "S" contains a CR not followed by LF/);
    expect(() => validateHeaderValue('S', 'a\r\r\n\tb')).toThrow(/CR not followed by LF/);
    expect(() => validateHeaderValue('S', 'a\nBcc: evil@example.com')).toThrow(/line break not followed by a space or tab/);
    expect(() => validateHeaderValue('S', 'a\r\n')).toThrow(/must not end with a line break/);
    expect(() => validateHeaderValue('S', Buffer.from('a\n'))).toThrow(InvalidArgumentError);
  });

  it('indices: chgheader from 1, insert from 0', () => {
    expect(() => validateHeaderIndex(1, 'change')).not.toThrow();
    expect(() => validateHeaderIndex(0, 'change')).toThrow(/header index 0 is invalid: expected an integer >= 1 \(it counts from 1 among headers of that name\)/);
    expect(() => validateHeaderIndex(0, 'insert')).not.toThrow();
    expect(() => validateHeaderIndex(-1, 'insert')).toThrow(/>= 0/);
    expect(() => validateHeaderIndex(1.5, 'insert')).toThrow(/1.5/);
  });
});

suite('envelope, quarantine, symlist', () => {
  it('envelope values', () => {
    expect(() => validateEnvelope('recipient', '<a@b>')).not.toThrow();
    expect(() => validateEnvelope('recipient', '')).toThrow(/recipient is empty/);
    expect(() => validateEnvelope('sender', '', true)).not.toThrow();
    expect(() => validateEnvelope('recipient', '<a@b>\r\nRCPT TO:<c@d>')).toThrow(/contains CR, LF or NUL/);
  });

  it('quarantine reasons', () => {
    expect(() => validateQuarantineReason('spam')).not.toThrow();
    expect(() => validateQuarantineReason('')).toThrow(/quarantine reason "" is invalid/);
    expect(() => validateQuarantineReason('a\nb')).toThrow(/expected a non-empty single line/);
  });

  it('symlists split on spaces and reject empties', () => {
    expect(normalizeSymlist(M_ENVFROM, ['i {auth_authen}', 'j'])).toEqual(['i', '{auth_authen}', 'j']);
    expect(normalizeSymlist(M_ENVFROM, 'i')).toEqual(['i']);
    expect(() => normalizeSymlist(M_ENVFROM, [' '])).toThrow(/macro list for stage 2 is empty/);
    expect(() => normalizeSymlist(9 as any, 'i')).toThrow(/macro stage 9 is invalid/);
  });
});

suite('checkStatus', () => {
  it.each([
    ['connect', CONTINUE, 0, CONTINUE],
    ['envrcpt', REJECT, 0, REJECT],
    ['eom', TEMPFAIL, 0, TEMPFAIL],
    ['body', SKIP, P_SKIP, SKIP],
    ['header', REJECT, P_NR_HDR, NOREPLY],
    ['header', undefined, P_NR_HDR, NOREPLY],
    ['body', NOREPLY, P_NR_BODY, NOREPLY],
    ['close', undefined, 0, CONTINUE],
    ['abort', 'anything', 0, CONTINUE],
  ] as const)('%s returning %s with steps %s gives %s', (cb, value, steps, expected) => {
    expect(checkStatus(cb, value, steps)).toBe(expected);
  });

  it.each([
    ['connect', undefined, 0, /connect returned undefined: expected a status/],
    ['eom', 99, 0, /eom returned 99/],
    ['eom', ALL_OPTS, 0, /only negotiate may return it/],
    ['eom', SKIP, P_SKIP, /eom returned SKIP: only body may return it/],
    ['body', SKIP, 0, /body returned SKIP but SMFIP_SKIP was not negotiated/],
    ['header', NOREPLY, 0, /header returned NOREPLY but its SMFIP_NR_\* step was not negotiated/],
  ] as const)('%s returning %s with steps %s is an error', (cb, value, steps, message) => {
    expect(() => checkStatus(cb, value, steps)).toThrow(InvalidStatusError);
    expect(() => checkStatus(cb, value, steps)).toThrow(message);
  });
});
