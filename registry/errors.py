"""Typed registry errors. Each message names the value, what was expected and what to do."""

from __future__ import annotations

from adaloc.errors import AdalocError


class RegistryError(AdalocError):
    """Base class of every error the registry and sites raise on purpose."""


class NotFoundError(RegistryError):
    """An unknown key version, alias, base, site, or a missing owner/site file."""


class IntegrityError(RegistryError):
    """A stored artifact's sha256 or size differs from what was published."""


class SignatureError(IntegrityError):
    """The owner's signature does not cover these bytes: tampered or foreign artifact."""


class NotAuthorizedError(RegistryError):
    """The site is not a recipient of a key version (revoked, never added, wrong key)."""


class BaseMismatchError(RegistryError):
    """A key version belongs to another base than the one it is applied to."""


class RollbackError(RegistryError):
    """A key version older than the installed one, without allow_rollback."""


class VersionConflictError(RegistryError):
    """Key version N exists with different content; published versions never change."""


class NotModifiedError(RegistryError):
    """A conditional download found the file unchanged since this process last fetched it."""


class UnavailableError(RegistryError):
    """The tracking server or artifact store cannot be reached (site works from cache)."""


class BadFileError(RegistryError):
    """A local owner or site file is empty, corrupt, of the wrong shape or kind of key, or
    encrypted without the passphrase; the message names the file and how to fix it."""


class TrustError(SignatureError):
    """A signed release record (root, targets, timestamp, promotion) is missing or invalid."""


class ExpiredError(TrustError):
    """A signed record is past its expiry: the registry is frozen or the owner stopped signing."""


class LimitError(IntegrityError):
    """A download is longer than its signed length (or the ceiling before one is known)."""


class SiteFileError(BadFileError):
    """A local site file is empty, garbage, of the wrong shape or holds the wrong kind of key."""


class LockedError(RegistryError):
    """Another pull holds the site's lock longer than the wait allowed."""
