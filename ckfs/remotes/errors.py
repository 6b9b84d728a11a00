"""The one error the registry client adds: the registry refused our credentials.

``ckfs.errors`` has no "unauthenticated" class, and the registry client must
not invent a parallel hierarchy, so `Unauthorized` is a `FailedPrecondition`:
the request is well formed, but the caller's state (missing or wrong
credentials, no access to the repository) forbids it, and retrying without
changing that state will fail again. It is not `NotFound` although
registries answer 401 for repositories that do not exist, because saying
"not found" would send a user with a typo in a password hunting for the
image; the message says both possibilities, as containerd's does.

Catch it as `FailedPrecondition` unless the distinction matters (a CLI hint
to log in, for example).
"""

from __future__ import annotations

from ckfs.errors import FailedPrecondition

__all__ = ["Unauthorized"]


class Unauthorized(FailedPrecondition):
    """The registry (or its token server) refused access after authentication."""
