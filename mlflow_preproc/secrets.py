"""Secrets never leave: what counts as one, and how it is shown instead.

Credentials reach the package inside URLs (``API_URL=http://user:password@svc:8080``, a
registry URL, a presigned ``?token=``) and in settings named for them
(``LIBRDKAFKA_SASL_PASSWORD``). Whatever the package writes where others read (logs, error
lines, ``/healthz``, metrics labels, dead-letter headers, image labels, the build history)
goes through here first.
"""

from __future__ import annotations

import re

REDACTED = "<redacted>"

# A variable whose name has one of these words holds a credential (LIBRDKAFKA_SASL_PASSWORD,
# AWS_SECRET_ACCESS_KEY, GITHUB_TOKEN, LIBRDKAFKA_SASL_JAAS_CONFIG...).
_SECRET_WORD = re.compile(r"(?:^|_)(?:PASSWORD|PASSWD|PWD|SECRET|TOKEN|KEY|APIKEY|CREDENTIALS?|"
                          r"SASL)(?:_|$)")

# scheme://user:password@host -> the password; scheme://token@host -> the token
_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s?#]+)@")
# ?token=..., &api_key=..., &X-Amz-Signature=...: query values whose names say secret
_SECRET_PARAM = re.compile(
    r"(?P<name>[?&;][^=&\s#]*(?:token|key|secret|password|passwd|pwd|signature|sig|auth|"
    r"credential)[^=&\s#]*=)(?P<value>[^&\s#'\"]+)", re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    """Whether a variable named ``name`` holds a credential, by the words of its name."""
    return _SECRET_WORD.search(name.upper()) is not None


def shown_value(name: str, value: str) -> str:
    """``value`` of the variable ``name`` as it may be shown: :data:`REDACTED` if the name
    says it is a credential, else with any URL credentials in it redacted."""
    return REDACTED if is_secret_name(name) else redact_url(value)


def redact_url(text: str, secrets_of: str | None = None) -> str:
    """``text`` with the credentials of every URL in it replaced by :data:`REDACTED`: the
    password of ``user:password@`` (a lone ``token@`` whole), and query values whose names
    say token, key, secret, password or signature. ``secrets_of``: a URL whose credentials
    are replaced wherever they appear in ``text`` too (a library's message may quote them
    apart from the URL)."""
    if secrets_of:
        for secret in _credentials(secrets_of):
            text = text.replace(secret, REDACTED)
    text = _USERINFO.sub(_shown_userinfo, text)
    return _SECRET_PARAM.sub(lambda m: m["name"] + REDACTED, text)


def _shown_userinfo(match: re.Match) -> str:
    user, sep, password = match["userinfo"].partition(":")
    if sep:
        return f"{match['head']}{user}:{REDACTED}@"
    return f"{match['head']}{REDACTED}@"


def _credentials(url: str) -> list[str]:
    found = []
    for match in _USERINFO.finditer(url):
        user, sep, password = match["userinfo"].partition(":")
        found.append(password if sep else user)
    found += [m["value"] for m in _SECRET_PARAM.finditer(url)]
    return [s for s in found if len(s) >= 4 and s != REDACTED]  # not "a", not the marker
