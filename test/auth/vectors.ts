// Test data from elsewhere, kept apart from the tests.
//
// RFC 8463 Appendix A (A.2 DNS records, A.3 the signed message): the Ed25519
// key is RFC 8037's (seed and public key below); the RSA key is 1024 bits.
// RFC 6376 Appendix A.1 is the same message (one space in "game. Are"); its
// body hash under simple canonicalization is RFC 8463's relaxed one.
//
// The SRS vectors are postsrsd 1.10's answers (Debian bookworm's `postsrsd`,
// queried over its TCP lookup tables on 2026-12-01, time 1796157944), with
// secret "tops3cr3t" unless said otherwise.

export const RFC8463_ED25519_SEED = 'nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A=';
export const RFC8463_ED25519_PUBLIC = '11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=';
export const RFC8463_ZONE: Record<string, string[]> = {
  'brisbane._domainkey.football.example.com TXT': [`v=DKIM1; k=ed25519; p=${RFC8463_ED25519_PUBLIC}`],
  'test._domainkey.football.example.com TXT': [
    'v=DKIM1; k=rsa; p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDkHlOQoBTzWRiGs5V6NpP3idY6Wk08a5qhdR6wy5bdOKb2jLQiY/J16JYi0Qvx/byYzCNb3W91y3FutACDfzwQ/BC/e/8uBsCR+yz1Lxj+PL6lHvqMKrM3rG4hstT5QjvHO9PzoxZyVYLzBfO2EeC3Ip3G+2kryOTIKT+l/K4w3QIDAQAB',
  ],
};
export const RFC_BODY_HASH = '2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=';

const HEADERS = [
  'From: Joe SixPack <joe@football.example.com>',
  'To: Suzie Q <suzie@shopping.example.net>',
  'Subject: Is dinner ready?',
  'Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)',
  'Message-ID: <20030712040037.46341.5F8J@football.example.com>',
];
/** RFC 8463 A.3 without its signatures. */
export const RFC8463_UNSIGNED = [...HEADERS, '', 'Hi.', '', 'We lost the game.  Are you hungry yet?', '', 'Joe.', ''].join('\r\n');
/** RFC 6376 A.1. */
export const RFC6376_UNSIGNED = [...HEADERS, '', 'Hi.', '', 'We lost the game. Are you hungry yet?', '', 'Joe.', ''].join('\r\n');

export const RFC8463_SIGNATURES = [
  'DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;',
  ' d=football.example.com; i=@football.example.com;',
  ' q=dns/txt; s=brisbane; t=1528637909; h=from : to :',
  ' subject : date : message-id : from : subject : date;',
  ' bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;',
  ' b=/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11Bus',
  ' Fa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw==',
  'DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;',
  ' d=football.example.com; i=@football.example.com;',
  ' q=dns/txt; s=test; t=1528637909; h=from : to : subject :',
  ' date : message-id : from : subject : date;',
  ' bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;',
  ' b=F45dVWDfMbQDGHJFlXUNB2HKfbCeLRyhDXgFpEL8GwpsRe0IeIixNTe3',
  ' DhCVlUrSjV4BwcVcOF6+FF3Zo9Rpo1tFOeS9mPYQTnGdaSGsgeefOsk2Jz',
  ' dA+L10TeYt9BgDfQNZtKdN1WO//KgIqXP7OdEFE4LjFYNcUxZQ4FADY+8=',
  '',
].join('\r\n');

/** RFC 6376 §3.4.6's canonicalization example body, and its canonical forms. */
export const RFC6376_CANON_BODY = ' C \r\nD \t E\r\n\r\n\r\n';
export const RFC6376_RELAXED_BODY = ' C\r\nD E\r\n';
export const RFC6376_SIMPLE_BODY = ' C \r\nD \t E\r\n';

export const POSTSRSD_NOW = 1796157944_000;
/** [postsrsd settings, input, forward result (undefined: not rewritten)]. */
export const POSTSRSD_FORWARD: [{ domain: string; secrets: string[]; separator?: '=' | '+' | '-'; excludeDomains?: string[] }, string, string | undefined][] = [
  [{ domain: 'srs.example', secrets: ['tops3cr3t'] }, 'alice@example.com', 'SRS0=mWRv=JU=example.com=alice@srs.example'],
  [{ domain: 'srs.example', secrets: ['tops3cr3t'] }, 'Alice.Smith@Example.COM', 'SRS0=eqMA=JU=Example.COM=Alice.Smith@srs.example'],
  [{ domain: 'srs.example', secrets: ['tops3cr3t'] }, 'user+tag@example.net', 'SRS0=AYlC=JU=example.net=user+tag@srs.example'],
  [{ domain: 'srs.example', secrets: ['tops3cr3t'], excludeDomains: ['excluded.example', '.sub.example'] }, 'bob@excluded.example', undefined],
  [{ domain: 'srs.example', secrets: ['tops3cr3t'], excludeDomains: ['excluded.example', '.sub.example'] }, 'carol@a.sub.example', undefined],
  [{ domain: 'srs.example', secrets: ['tops3cr3t'] }, 'dave@srs.example', undefined],
  [{ domain: 'srs.example', secrets: ['tops3cr3t'] }, 'SRS0+xyzw=JU=x.example=joe@first.example', 'SRS1=dogA=first.example=+xyzw=JU=x.example=joe@srs.example'],
  [{ domain: 'srs.example', secrets: ['tops3cr3t'] }, 'SRS0=oslY=JU=example.com=alice@other.example', 'SRS1=/6AE=other.example==oslY=JU=example.com=alice@srs.example'],
  [{ domain: 'fwd2.example', secrets: ['tops3cr3t'], separator: '+' }, 'alice@example.com', 'SRS0+mWRv=JU=example.com=alice@fwd2.example'],
  [{ domain: 'fwd2.example', secrets: ['tops3cr3t'], separator: '+' }, 'SRS1=AAAA=first.example==mWRv=JU=example.com=alice@second.example', 'SRS1+YN5K=first.example==mWRv=JU=example.com=alice@fwd2.example'],
  // postsrsd: "500 Already rewritten" (a valid address of our own secret, at any domain).
  [{ domain: 'fwd2.example', secrets: ['tops3cr3t'], separator: '+' }, 'SRS0=mWRv=JU=example.com=alice@srs.example', undefined],
  [{ domain: 'srs.example', secrets: ['n3w-s3cret', 'tops3cr3t'] }, 'alice@example.com', 'SRS0=oslY=JU=example.com=alice@srs.example'],
  [{ domain: 'srs.example', secrets: ['n3w-s3cret', 'tops3cr3t'] }, 'SRS0=mWRv=JU=example.com=alice@other.example', undefined],
  [{ domain: 'srs.example', secrets: ['tops3cr3t'] }, 'SRS1=abc@first.example', undefined], // "No host in SRS1 address."
  [{ domain: 'srs.example', secrets: ['tops3cr3t'] }, 'SRS1=abc=first.example@x.example', undefined], // "No user in SRS1 address."
  [{ domain: 'srs.example', secrets: ['tops3cr3t'] }, 'SRS0=@x.example', 'SRS1=HHFQ=x.example==@srs.example'],
  [{ domain: 'srs.example', secrets: ['tops3cr3t'] }, 'srs0=abcd=JU=a.example=u@x.example', 'SRS1=hNUQ=x.example==abcd=JU=a.example=u@srs.example'],
];
/** [settings, input, reversed address | error reason]. */
export const POSTSRSD_REVERSE: [{ domain: string; secrets: string[] }, string, string | { reason: string }][] = [
  [{ domain: 'srs.example', secrets: ['tops3cr3t'] }, 'SRS0=mWRv=JU=example.com=alice@srs.example', 'alice@example.com'],
  [{ domain: 'srs.example', secrets: ['tops3cr3t'] }, 'srs0=mwrv=ju=example.com=alice@srs.example', 'alice@example.com'],
  [{ domain: 'srs.example', secrets: ['tops3cr3t'] }, 'SRS0=eqMA=JU=Example.COM=Alice.Smith@srs.example', 'Alice.Smith@Example.COM'],
  [{ domain: 'srs.example', secrets: ['tops3cr3t'] }, 'SRS0=mWRw=JU=example.com=alice@srs.example', { reason: 'bad-hash' }], // "Hash invalid in SRS address."
  [{ domain: 'srs.example', secrets: ['tops3cr3t'] }, 'SRS0=mWRv=JA=example.com=alice@srs.example', { reason: 'bad-hash' }],
  [{ domain: 'srs.example', secrets: ['tops3cr3t'] }, 'SRS0=mWR=JU=example.com=alice@srs.example', { reason: 'bad-hash' }], // "Hash too short in SRS address."
  [{ domain: 'srs.example', secrets: ['tops3cr3t'] }, 'SRS0=mWRv=JU=example.com@srs.example', { reason: 'bad-format' }], // "No user in SRS0 address."
  [{ domain: 'srs.example', secrets: ['tops3cr3t'] }, 'SRS0=UYUp=I6=example.com=alice@srs.example', { reason: 'expired' }], // 22 days old: "Time stamp out of date."
  [{ domain: 'srs.example', secrets: ['tops3cr3t'] }, 'SRS0=6Hf5=I7=example.com=alice@srs.example', 'alice@example.com'], // 21 days old: still valid
  [{ domain: 'srs.example', secrets: ['tops3cr3t'] }, 'SRS1=dogA=first.example=+xyzw=JU=x.example=joe@srs.example', 'SRS0+xyzw=JU=x.example=joe@first.example'],
  [{ domain: 'srs.example', secrets: ['tops3cr3t'] }, 'SRS1=dogB=first.example=+xyzw=JU=x.example=joe@srs.example', { reason: 'bad-hash' }],
  [{ domain: 'fwd2.example', secrets: ['tops3cr3t'] }, 'SRS1+YN5K=first.example==mWRv=JU=example.com=alice@fwd2.example', 'SRS0=mWRv=JU=example.com=alice@first.example'],
  [{ domain: 'srs.example', secrets: ['n3w-s3cret', 'tops3cr3t'] }, 'SRS0=mWRv=JU=example.com=alice@srs.example', 'alice@example.com'],
  [{ domain: 'srs.example', secrets: ['tops3cr3t'] }, 'alice@example.com', { reason: 'not-srs' }], // "Not an SRS address."
];
