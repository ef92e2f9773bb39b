"""Local fake push providers for tests/tests/push_send.rs and push-bench.

One ASGI app served by hypercorn on one port, HTTP/1.1 and HTTP/2 (h2c with
prior knowledge, as the APNs client speaks to an http:// base URL):

  POST /3/device/<token>                     APNs: must be HTTP/2; checks the path, the
                                             apns-* headers and the ES256 provider token
                                             (kid, iss, iat, signature) against the test key
  POST /token                                FCM OAuth2 token endpoint: checks the RS256
                                             jwt-bearer assertion against the service
                                             account's public key, issues access tokens
  POST /v1/projects/<project>/messages:send  FCM HTTP v1: checks the bearer token
  POST /wp/<id>                              Web Push endpoint: checks TTL/Urgency/Topic, the
                                             VAPID JWT (aud = this origin, signed by k) and
                                             DECRYPTS the aes128gcm body with http_ece and the
                                             subscription's private key
  POST /hook/<name>                          webhook receiver: checks the HMAC-SHA256 over
                                             "<timestamp>.<body>"

Control API (JSON):
  POST /control/subscription                 a new Web Push subscription {endpoint, keys}
  POST /control/script  {"token": t, "answers": [{"status": 503, "reason": "...",
                         "retry_after": 2}, ...]}  answers for the next requests of token t
                         (the device token, FCM token, Web Push id or webhook name);
                         then 200 again
  GET  /control/requests?token=t             every request for t: time, status, dedupe key,
                                             payload (Web Push: the decrypted plaintext)
  GET  /control/counts                       per dedupe key: requests, accepted (2xx), and
                                             distinct accepted apns-ids; violations
  GET  /control/times                        [arrival s, task created_ts ms] of every accepted request
  POST /control/delay {"ms": n}              every provider answer waits n ms (kill tests)

Keys: at start the fake writes its test keys into --keys-dir (apns.p8,
fcm-service-account.json, vapid.key, webhook.secret); the worker under test
reads them from there. The fake checks signatures against the public halves.

Prints "LISTENING <port>" once it accepts connections.
"""

import argparse
import asyncio
import base64
import collections
import hashlib
import hmac
import json
import logging
import os
import socket
import sys
import time
import uuid
from urllib.parse import parse_qs

import http_ece
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypercorn.asyncio import serve
from hypercorn.config import Config

APNS_TEAM = "TEAM123456"
APNS_KEY_ID = "KEY1234567"
APNS_TOPIC = "org.example.chat"
FCM_PROJECT = "chat-test"
FCM_EMAIL = "push@chat-test.iam.gserviceaccount.com"
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"


def b64u(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64u(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class State:
    def __init__(self, keys_dir, port):
        self.port = port
        self.origin = f"http://127.0.0.1:{port}"
        os.makedirs(keys_dir, exist_ok=True)
        self.apns_key = ec.generate_private_key(ec.SECP256R1())
        with open(os.path.join(keys_dir, "apns.p8"), "wb") as f:
            f.write(self.apns_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        self.fcm_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = self.fcm_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
        self.token_url = f"{self.origin}/token"
        with open(os.path.join(keys_dir, "fcm-service-account.json"), "w") as f:
            json.dump({"type": "service_account", "project_id": FCM_PROJECT, "private_key_id": "k1", "private_key": pem,
                       "client_email": FCM_EMAIL, "token_uri": self.token_url}, f)
        self.vapid_key = ec.generate_private_key(ec.SECP256R1())
        raw = self.vapid_key.private_numbers().private_value.to_bytes(32, "big")
        with open(os.path.join(keys_dir, "vapid.key"), "w") as f:
            f.write(b64u(raw))
        self.vapid_public = b64u(self.vapid_key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint))
        self.webhook_secret = b64u(os.urandom(24))
        with open(os.path.join(keys_dir, "webhook.secret"), "w") as f:
            f.write(self.webhook_secret)
        self.subscriptions = {}  # id -> (private key, auth)
        self.access_tokens = set()
        self.token_grants = 0
        self.scripts = collections.defaultdict(collections.deque)
        self.requests = collections.defaultdict(list)  # token -> [record]
        self.req_count = collections.Counter()
        self.accepted = collections.Counter()
        self.accepted_ids = collections.Counter()
        self.violations = []
        self.apns_tokens_seen = {}  # provider token -> iat
        self.times = []  # (arrival, created_ts ms) of every accepted request
        self.delay = 0.0  # seconds every provider answer waits (POST /control/delay)
        self.ids_of_key = collections.defaultdict(set)  # dedupe key -> accepted apns-ids

    def violation(self, what):
        self.violations.append(what)
        print("VIOLATION", what, file=sys.stderr, flush=True)


class ClientGone(Exception):
    """The client disconnected before its request body was complete (e.g. a
    worker killed with kill -9 mid-request): nothing was received, so
    nothing is judged or counted. A real provider never sees such a request
    either (the HTTP/2 stream never ended)."""


async def read_body(receive):
    body = b""
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientGone()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            return body


async def respond(send, status, body=b"", headers=()):
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        headers = list(headers) + [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": status, "headers": list(headers)})
    await send({"type": "http.response.body", "body": body})


def make_app(st):
    def scripted(token, provider):
        """The next scripted answer for token: (status, reason, headers)."""
        q = st.scripts.get(token)
        if q:
            a = q.popleft()
            hs = []
            if a.get("retry_after") is not None:
                hs.append((b"retry-after", str(a["retry_after"]).encode()))
            return a.get("status", 200), a.get("reason", ""), hs
        return 200, "", []

    def record(provider, token, key, status, payload, apns_id=None):
        st.requests[token].append({"provider": provider, "t": time.time(), "status": status, "dedupe_key": key,
                                   "apns_id": apns_id, "payload": payload})
        st.req_count[key] += 1
        if 200 <= status < 300:
            data = (payload or {}).get("chat") or (payload or {}).get("data") or {}
            st.times.append((time.time(), data.get("created_ts")))
            st.accepted[key] += 1
            if apns_id:
                st.accepted_ids[apns_id] += 1
                st.ids_of_key[key].add(apns_id)

    async def apns(scope, receive, send, token):
        h = {k.decode(): v.decode() for k, v in scope["headers"]}
        body = await read_body(receive)
        if scope.get("http_version") != "2":
            st.violation(f"APNs request over HTTP/{scope.get('http_version')}")
            return await respond(send, 400, {"reason": "BadRequest"})
        problems = []
        auth = h.get("authorization", "")
        if not auth.startswith("bearer "):
            problems.append("no bearer provider token")
        else:
            t = auth[len("bearer "):]
            if t in st.apns_tokens_seen and time.time() - st.apns_tokens_seen[t] < 3600:
                pass  # verified before (the same provider token is reused for up to an hour)
            else:
                try:
                    header = jwt.get_unverified_header(t)
                    claims = jwt.decode(t, st.apns_key.public_key(), algorithms=["ES256"], options={"verify_aud": False, "require": ["iss", "iat"]})
                    if header.get("kid") != APNS_KEY_ID or claims.get("iss") != APNS_TEAM:
                        problems.append(f"wrong kid/iss {header} {claims}")
                    if abs(time.time() - claims["iat"]) > 3600:
                        problems.append("provider token older than an hour")
                    st.apns_tokens_seen[t] = claims["iat"]
                except Exception as e:  # noqa: BLE001
                    problems.append(f"provider token does not verify: {e}")
                    await respond(send, 403, {"reason": "InvalidProviderToken"})
                    st.violation(problems)
                    return
        if h.get("apns-topic") != APNS_TOPIC:
            problems.append(f"apns-topic {h.get('apns-topic')}")
        if h.get("apns-push-type") not in ("alert", "background"):
            problems.append("apns-push-type")
        if h.get("apns-priority") not in ("5", "10"):
            problems.append("apns-priority")
        apns_id = h.get("apns-id", "")
        try:
            uuid.UUID(apns_id)
        except ValueError:
            problems.append("apns-id is not a UUID")
        if len(h.get("apns-collapse-id", "").encode()) > 64:
            problems.append("apns-collapse-id over 64 bytes")
        try:
            payload = json.loads(body)
            assert "aps" in payload and "alert" in payload["aps"]
        except Exception:  # noqa: BLE001
            problems.append("payload is not an aps JSON")
            payload = None
        if not all(c in "0123456789abcdefABCDEF" for c in token) or not token:
            problems.append("device token is not hex")
        if problems:
            st.violation(problems)
            return await respond(send, 400, {"reason": "BadRequest", "problems": problems})
        key = (payload.get("chat") or {}).get("dedupe_key")
        if st.delay:
            await asyncio.sleep(st.delay)
        status, reason, hs = scripted(token, "apns")
        record("apns", token, key, status, payload, apns_id)
        hs = hs + [(b"apns-id", apns_id.encode())]
        if status == 200:
            return await respond(send, 200, b"", hs)
        body = {"reason": reason or "InternalServerError"}
        if status == 410:
            body["timestamp"] = int(time.time() * 1000)
        return await respond(send, status, body, hs)

    async def fcm_token(scope, receive, send):
        form = parse_qs((await read_body(receive)).decode())
        try:
            assert form["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"], "grant_type"
            claims = jwt.decode(form["assertion"][0], st.fcm_key.public_key(), algorithms=["RS256"], audience=st.token_url)
            assert claims["iss"] == FCM_EMAIL, "iss"
            assert FCM_SCOPE in claims["scope"].split(), "scope"
            assert claims["exp"] - claims["iat"] <= 3600, "lifetime"
        except Exception as e:  # noqa: BLE001
            st.violation(f"FCM assertion refused: {e!r}")
            return await respond(send, 400, {"error": "invalid_grant", "error_description": repr(e)})
        t = "ya29.fake-" + b64u(os.urandom(12))
        st.access_tokens.add(t)
        st.token_grants += 1
        return await respond(send, 200, {"access_token": t, "expires_in": 3599, "token_type": "Bearer"})

    async def fcm_send(scope, receive, send, project):
        h = {k.decode(): v.decode() for k, v in scope["headers"]}
        body = await read_body(receive)
        if project != FCM_PROJECT:
            st.violation(f"FCM project {project}")
            return await respond(send, 404, {"error": {"code": 404, "status": "NOT_FOUND"}})
        auth = h.get("authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in st.access_tokens:
            st.violation("FCM send without a granted access token")
            return await respond(send, 401, {"error": {"code": 401, "status": "UNAUTHENTICATED"}})
        try:
            msg = json.loads(body)["message"]
            token = msg["token"]
            key = msg["data"]["dedupe_key"]
            assert all(isinstance(v, str) for v in msg["data"].values()), "data values must be strings"
        except Exception as e:  # noqa: BLE001
            st.violation(f"FCM message malformed: {e!r}")
            return await respond(send, 400, {"error": {"code": 400, "status": "INVALID_ARGUMENT"}})
        status, reason, hs = scripted(token, "fcm")
        record("fcm", token, key, status, msg)
        if status == 200:
            return await respond(send, 200, {"name": f"projects/{project}/messages/{uuid.uuid4()}"}, hs)
        code = reason or {404: "UNREGISTERED", 429: "QUOTA_EXCEEDED", 400: "INVALID_ARGUMENT"}.get(status, "UNAVAILABLE")
        err = {"error": {"code": status, "message": code, "status": "INVALID_ARGUMENT" if status == 400 else code,
                         "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}]}}
        return await respond(send, status, err, hs)

    async def webpush(scope, receive, send, sub_id):
        h = {k.decode(): v.decode() for k, v in scope["headers"]}
        body = await read_body(receive)
        if sub_id not in st.subscriptions:
            return await respond(send, 404, b"no such subscription")
        problems = []
        if h.get("content-encoding") != "aes128gcm":
            problems.append("content-encoding")
        if not h.get("ttl", "").isdigit():
            problems.append("TTL")
        if h.get("urgency") not in ("very-low", "low", "normal", "high"):
            problems.append("Urgency")
        topic = h.get("topic")
        if topic is not None and (len(topic) > 32 or not all(c.isalnum() or c in "-_" for c in topic)):
            problems.append("Topic")
        auth = h.get("authorization", "")
        try:
            assert auth.startswith("vapid "), "scheme"
            parts = dict(p.strip().split("=", 1) for p in auth[6:].split(","))
            k = parts["k"]
            assert k == st.vapid_public, "k is not the VAPID key"
            pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), unb64u(k))
            claims = jwt.decode(parts["t"], pub, algorithms=["ES256"], audience=st.origin)
            assert claims["exp"] > time.time() and claims["exp"] - time.time() <= 24 * 3600, "exp"
            assert claims.get("sub", "").startswith(("mailto:", "https:")), "sub"
        except Exception as e:  # noqa: BLE001
            problems.append(f"VAPID: {e!r}")
        try:
            priv, secret = st.subscriptions[sub_id]
            plain = http_ece.decrypt(body, private_key=priv, auth_secret=secret, version="aes128gcm")
            payload = json.loads(plain)
        except Exception as e:  # noqa: BLE001
            problems.append(f"decrypt: {e!r}")
            payload = None
        if problems:
            st.violation(problems)
            return await respond(send, 400, {"problems": problems})
        key = (payload.get("data") or {}).get("dedupe_key")
        status, reason, hs = scripted(sub_id, "webpush")
        payload["_headers"] = {"ttl": h.get("ttl"), "urgency": h.get("urgency"), "topic": topic}
        record("webpush", sub_id, key, status, payload)
        if status < 300:
            return await respond(send, 201, b"", hs + [(b"location", f"{st.origin}/msg/{uuid.uuid4()}".encode())])
        return await respond(send, status, (reason or "error").encode(), hs)

    async def webhook(scope, receive, send, name):
        h = {k.decode(): v.decode() for k, v in scope["headers"]}
        body = await read_body(receive)
        ts = h.get("x-chat-timestamp", "")
        expect = "v1=" + hmac.new(st.webhook_secret.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
        if not ts.isdigit() or abs(time.time() - int(ts)) > 300 or not hmac.compare_digest(expect, h.get("x-chat-signature", "")):
            st.violation("webhook signature does not verify")
            return await respond(send, 401, b"bad signature")
        payload = json.loads(body)
        key = h.get("x-chat-dedupe-key")
        if key != payload.get("dedupe_key"):
            st.violation("X-Chat-Dedupe-Key differs from the body")
        status, reason, hs = scripted(name, "webhook")
        payload["_signature_ok"] = True
        record("webhook", name, key, status, payload)
        return await respond(send, status if status != 200 else 204, (reason or "").encode(), hs)

    async def control(scope, receive, send, path):
        body = await read_body(receive)
        q = parse_qs(scope.get("query_string", b"").decode())
        if path == "/control/subscription":
            priv = ec.generate_private_key(ec.SECP256R1())
            secret = os.urandom(16)
            sid = uuid.uuid4().hex
            st.subscriptions[sid] = (priv, secret)
            pub = priv.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
            return await respond(send, 200, {"id": sid, "endpoint": f"{st.origin}/wp/{sid}", "keys": {"p256dh": b64u(pub), "auth": b64u(secret)}})
        if path == "/control/script":
            req = json.loads(body)
            st.scripts[req["token"]].extend(req["answers"])
            return await respond(send, 200, {"ok": True})
        if path == "/control/times":
            return await respond(send, 200, st.times)
        if path == "/control/delay":
            st.delay = json.loads(body)["ms"] / 1000.0
            return await respond(send, 200, {"ok": True})
        if path == "/control/requests":
            return await respond(send, 200, st.requests.get(q.get("token", [""])[0], []))
        if path == "/control/counts":
            return await respond(send, 200, {"requests": st.req_count, "accepted": st.accepted,
                                              "apns_ids_per_key": {k: len(v) for k, v in st.ids_of_key.items()},
                                              "violations": st.violations, "token_grants": st.token_grants,
                                              "apns_provider_tokens": len(st.apns_tokens_seen)})
        if path == "/control/keys":
            return await respond(send, 200, {"apns_team": APNS_TEAM, "apns_key_id": APNS_KEY_ID, "apns_topic": APNS_TOPIC,
                                              "fcm_project": FCM_PROJECT, "vapid_public": st.vapid_public})
        return await respond(send, 404, b"")

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        try:
            return await route(scope, receive, send)
        except ClientGone:
            print("client went away mid-request:", scope["path"], file=sys.stderr, flush=True)

    async def route(scope, receive, send):
        path = scope["path"]
        if path.startswith("/control/"):
            return await control(scope, receive, send, path)
        if scope["method"] != "POST":
            return await respond(send, 405, b"")
        if path.startswith("/3/device/"):
            return await apns(scope, receive, send, path[len("/3/device/"):])
        if path == "/token":
            return await fcm_token(scope, receive, send)
        if path.startswith("/v1/projects/") and path.endswith("/messages:send"):
            return await fcm_send(scope, receive, send, path[len("/v1/projects/"):-len("/messages:send")])
        if path.startswith("/wp/"):
            return await webpush(scope, receive, send, path[len("/wp/"):])
        if path.startswith("/hook/"):
            return await webhook(scope, receive, send, path[len("/hook/"):])
        return await respond(send, 404, b"")

    return app


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys-dir", required=True)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    # A worker killed with SIGKILL leaves sockets that asyncio warns about on every write.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(1024)
    sock.set_inheritable(True)
    port = sock.getsockname()[1]
    st = State(args.keys_dir, port)
    config = Config()
    config.bind = [f"fd://{sock.fileno()}"]
    config.accesslog = None
    config.errorlog = "-"
    config.loglevel = os.environ.get("PUSH_FAKES_LOGLEVEL", "WARNING")
    config.h2_max_concurrent_streams = 1000
    config.keep_alive_timeout = 600
    # hypercorn closes a connection after 1,000 requests by default; APNs keeps it for hours.
    config.keep_alive_max_requests = 10**9
    print(f"LISTENING {port}", flush=True)
    asyncio.run(serve(make_app(st), config))


if __name__ == "__main__":
    main()
