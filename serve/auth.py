"""Bearer-token auth, on when the key's environment variable is set in the serving process.

The key is compared in constant time and never logged or echoed.
"""
from __future__ import annotations

import hmac

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer $TLCR_API_KEY")


def make_auth_dependency(api_key: str | None):
    """A FastAPI dependency: 401 unless `Authorization: Bearer <api_key>`; a no-op when api_key is None."""
    if not api_key:
        async def no_auth() -> None:
            return None

        return no_auth
    expected = api_key.encode()

    async def require_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        given = credentials.credentials.encode() if credentials else b""
        if not hmac.compare_digest(given, expected):
            raise HTTPException(status_code=401, detail="missing or wrong bearer token (Authorization: Bearer <key>)",
                                headers={"WWW-Authenticate": "Bearer"})

    return require_key
