"""Bearer-token checks (serving-conventions §7): separate inference and admin tokens.

Tokens are kept only as SHA-256 digests and compared with `hmac.compare_digest` on the digests, so the
comparison time depends on neither the token's length nor its content; the scheme word is matched
case-insensitively (RFC 7235), the token itself exactly.
"""

from __future__ import annotations

import hashlib
import hmac

from pydantic import SecretStr


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenVerifier:
    def __init__(self, token: SecretStr | str | None) -> None:
        secret = token.get_secret_value() if isinstance(token, SecretStr) else token
        self._digest = _digest(secret) if secret else None

    @property
    def enabled(self) -> bool:
        return self._digest is not None

    def verify(self, authorization: str | None) -> bool:
        """True when no token is configured, or the header carries exactly the configured token."""
        if self._digest is None:
            return True
        if not authorization:
            return False
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() != "bearer" or not credentials:
            return False
        return hmac.compare_digest(_digest(credentials.strip()), self._digest)
