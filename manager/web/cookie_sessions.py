"""Flask's signed-cookie sessions, without the signer for requests that carry no cookie.

Every request opens a session. Flask builds its itsdangerous signer (a key derivation)
before it even looks for the cookie; the webhook's requests never carry one, and at
hundreds of callbacks a second that is CPU spent for nothing. A request without the
cookie gets the same empty session Flask would give it.
"""

from __future__ import annotations

from flask import Flask, Request
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface


class CookieSessionInterface(SecureCookieSessionInterface):
    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        if self.get_cookie_name(app) not in request.cookies:
            return self.session_class()
        return super().open_session(app, request)
