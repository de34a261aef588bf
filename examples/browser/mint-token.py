#!/usr/bin/env python3
"""Mints a signed client token (JWT, HS256) for the browser demo, with nothing but the standard
library. Your own auth server does this in production; the gateway only checks the tokens.

    DEMO_JWT_SECRET=... python3 mint-token.py alice [seconds]

The secret must be the endpoint's `auth.jwt.hs256_secret` (at least 32 bytes).
"""
import base64
import hashlib
import hmac
import json
import os
import sys
import time


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint(secret: bytes, sub: str, seconds: int) -> str:
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = b64(json.dumps({"sub": sub, "exp": int(time.time()) + seconds}).encode())
    signed = f"{header}.{claims}".encode()
    return f"{header}.{claims}.{b64(hmac.new(secret, signed, hashlib.sha256).digest())}"


if __name__ == "__main__":
    secret = os.environ.get("DEMO_JWT_SECRET")
    if not secret or len(sys.argv) < 2:
        sys.exit(__doc__)
    seconds = int(sys.argv[2]) if len(sys.argv) > 2 else 600
    print(mint(secret.encode(), sys.argv[1], seconds))
