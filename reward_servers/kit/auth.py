"""Optional bearer-token auth for the /v1/* endpoints (probes and /metrics stay open).

The OpenAPI document says what the server does: a server with a token declares bearer auth on /v1/* (and refuses a
request without it); a server without one declares none.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from reward_servers.kit.errors import error_responses

bearer_scheme = HTTPBearer(auto_error=False, description="the server's DDPO_REWARD_AUTH_TOKEN")


def auth_route_options(token: SecretStr | None) -> dict[str, Any]:
    """`include_router` options for the /v1/* routes: with a token, the bearer check and its documented 401; without
    one, nothing (so that the OpenAPI document declares no auth either)."""
    if token is None:
        return {}
    return {"dependencies": [Depends(require_token)], "responses": error_responses(401)}


async def require_token(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]
) -> None:
    """401 unless the request carries `Authorization: Bearer <token>` with the server's token."""
    token: SecretStr = request.app.state.settings.auth_token
    given = credentials.credentials.encode() if credentials is not None else b""
    if not hmac.compare_digest(given, token.get_secret_value().encode()):
        raise HTTPException(401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})
