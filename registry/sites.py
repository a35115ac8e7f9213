"""Old name of :mod:`registry.keyring` (the owner's keyring), kept so existing imports work.

Renamed so it reads apart from :mod:`registry.site` (a deployment site).
"""

from registry.keyring import *  # noqa: F401,F403
from registry.keyring import OwnerKeyring, SiteEntry  # noqa: F401
