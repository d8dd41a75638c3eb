// A real OpenID Connect provider (oidc-provider) for the end-to-end auth
// tests, on an ephemeral 127.0.0.1 port. It prints `READY <port>` once it
// listens; the issuer is `http://127.0.0.1:<port>`. With IDP_TLS_CERT and
// IDP_TLS_KEY (PEM files) set, it also listens with TLS, prints
// `READY <port> <tls port>`, and the issuer is `https://127.0.0.1:<tls port>`
// (the plain port still serves everything, for the tests' own calls).
//
// Clients: `svc` / `svc-secret` (client_credentials, scopes read write
// admin) and `gateway` / `gateway-secret` (introspection).
// Resource servers (the `resource` parameter of the token request; the
// access token's `aud`):
//   https://api.example     JWT access tokens signed RS256
//   https://es.example      JWT access tokens signed ES256
//   https://ed.example      JWT access tokens signed EdDSA
//   https://opaque.example  opaque access tokens (introspection only)
//
// Test-only endpoints, answered before the provider:
//   POST /__rotate          new RSA signing key (new kid); the old one stays
//                           published unless `?drop=1`. Answers {"kid": ...}.
//   GET  /__forge?kind=K    a hostile token: none, hs256-confusion, expired,
//                           wrong-aud, wrong-iss, not-yet-valid, unknown-kid,
//                           hs256-shared (a good HS256 token),
//                           hs256-numeric-sub (good, but `sub` is 42).
//                           Answers {"token": ...}.

import { KeyObject, createHmac } from 'node:crypto';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';

import { SignJWT, exportJWK, generateKeyPair } from 'jose';
import Provider from 'oidc-provider';

const RESOURCES = {
  'https://api.example': { format: 'jwt', alg: 'RS256' },
  'https://es.example': { format: 'jwt', alg: 'ES256' },
  'https://ed.example': { format: 'jwt', alg: 'EdDSA' },
  'https://opaque.example': { format: 'opaque' },
};
const TTL = 300;

let rsaCount = 0;
async function rsaKey() {
  rsaCount += 1;
  const { privateKey, publicKey } = await generateKeyPair('RS256', { extractable: true });
  const jwk = await exportJWK(privateKey);
  return { kid: `rsa-${rsaCount}`, privateKey, publicKey, jwk: { ...jwk, kid: `rsa-${rsaCount}`, alg: 'RS256', use: 'sig' } };
}

async function otherKey(alg, kid) {
  const { privateKey } = await generateKeyPair(alg, { extractable: true, crv: alg === 'EdDSA' ? 'Ed25519' : undefined });
  const jwk = await exportJWK(privateKey);
  return { ...jwk, kid, alg, use: 'sig' };
}

const ec = await otherKey('ES256', 'ec-1');
const ed = await otherKey('EdDSA', 'ed-1');
let rsa = [await rsaKey()];

async function listen(server) {
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return server.address().port;
}
const port = await listen(http.createServer((req, res) => handle(req, res)));
let tlsPort = null;
if (process.env.IDP_TLS_CERT) {
  const options = { cert: readFileSync(process.env.IDP_TLS_CERT), key: readFileSync(process.env.IDP_TLS_KEY) };
  tlsPort = await listen(https.createServer(options, (req, res) => handle(req, res)));
}
const issuer = tlsPort ? `https://127.0.0.1:${tlsPort}` : `http://127.0.0.1:${port}`;

function makeProvider() {
  const provider = new Provider(issuer, {
    clients: [
      {
        client_id: 'svc',
        client_secret: 'svc-secret',
        grant_types: ['client_credentials'],
        redirect_uris: [],
        response_types: [],
        scope: 'read write admin',
      },
      {
        client_id: 'gateway',
        client_secret: 'gateway-secret',
        grant_types: [],
        redirect_uris: [],
        response_types: [],
      },
    ],
    jwks: { keys: [...rsa.map((k) => k.jwk), ec, ed] },
    scopes: ['openid', 'read', 'write', 'admin'],
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => 'https://api.example',
        useGrantedResource: () => true,
        getResourceServerInfo: (_ctx, resource) => {
          const r = RESOURCES[resource];
          if (!r) throw new Error(`unknown resource ${resource}`);
          const info = { scope: 'read write admin', audience: resource, accessTokenTTL: TTL, accessTokenFormat: r.format };
          if (r.alg) info.jwt = { sign: { alg: r.alg } };
          return info;
        },
      },
    },
  });
  return provider.callback();
}

let callback = makeProvider();

async function forge(kind) {
  const now = Math.floor(Date.now() / 1000);
  const key = rsa[0];
  const claims = { sub: 'svc', client_id: 'svc', scope: 'read', iss: issuer, aud: 'https://api.example', iat: now, exp: now + TTL, jti: `forged-${kind}` };
  const sign = (c, k = key.privateKey, kid = key.kid) =>
    new SignJWT(c).setProtectedHeader({ alg: 'RS256', kid, typ: 'at+jwt' }).sign(k);
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  switch (kind) {
    case 'none':
      return `${b64({ alg: 'none', typ: 'JWT' })}.${b64(claims)}.`;
    case 'hs256-confusion': {
      // The RSA public key (as PEM, as a naive verifier would load it) used as an HMAC secret.
      const pem = KeyObject.from(key.publicKey).export({ type: 'spki', format: 'pem' });
      const input = `${b64({ alg: 'HS256', typ: 'JWT', kid: key.kid })}.${b64(claims)}`;
      const sig = createHmac('sha256', pem).update(input).digest('base64url');
      return `${input}.${sig}`;
    }
    case 'expired':
      return sign({ ...claims, iat: now - 3600, exp: now - 1800 });
    case 'not-yet-valid':
      return sign({ ...claims, nbf: now + 1800 });
    case 'wrong-aud':
      return sign({ ...claims, aud: 'https://other.example' });
    case 'wrong-iss':
      return sign({ ...claims, iss: 'http://evil.example' });
    case 'hs256-shared':
    case 'hs256-numeric-sub': {
      // Signed with the shared secret of the gateway's HS256 provider (HS256_SECRET in tests/src/idp.rs);
      // hs256-numeric-sub has a `sub` that is not a name (and a client_id that is).
      const c = kind === 'hs256-shared' ? claims : { ...claims, sub: 42, client_id: 'admin' };
      const input = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ ...c, jti: kind })}`;
      const sig = createHmac('sha256', 'hs256-shared-secret-for-the-tests-0123').update(input).digest('base64url');
      return `${input}.${sig}`;
    }
    case 'unknown-kid': {
      const stranger = await rsaKey();
      rsaCount -= 1;
      return sign(claims, stranger.privateKey, 'stranger');
    }
    default:
      throw new Error(`unknown kind ${kind}`);
  }
}

function json(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body));
}

async function handle(req, res) {
  const url = new URL(req.url, issuer);
  try {
    if (url.pathname === '/__rotate' && req.method === 'POST') {
      const next = await rsaKey();
      rsa = url.searchParams.get('drop') ? [next] : [next, ...rsa];
      callback = makeProvider();
      return json(res, 200, { kid: next.kid });
    }
    if (url.pathname === '/__forge') {
      return json(res, 200, { token: await forge(url.searchParams.get('kind')) });
    }
  } catch (e) {
    return json(res, 500, { error: String(e) });
  }
  return callback(req, res);
}

process.stdout.write(tlsPort ? `READY ${port} ${tlsPort}\n` : `READY ${port}\n`);
