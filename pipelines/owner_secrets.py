"""The owner's keyring from a Prefect ``Secret`` block, for workers that get secrets that way.

The block's value is a JSON object: keyring file name -> content (``owner.key``,
``owner.pub``, ``owner-recipient.key``, ``owner-recipient.pub`` as PEM text, ``sites.json``
as an object; ``owner-recipient-retired/<fingerprint>.key`` for each recipient key a root
rotation retired into the keyring), and optionally ``passphrase``. A flow writes the files
into its 0700 scratch folder (0600 each; the private keys stay passphrase-encrypted when
they were) and opens the keyring there; the folder is removed when the flow run ends. The
value is never a parameter, a result or a log line: errors name the block and missing
fields, never a value.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from adaloc.errors import ConfigError

KEYRING_FILES = ("owner.key", "owner.pub", "owner-recipient.key", "owner-recipient.pub")
SITES_FILE = "sites.json"
PASSPHRASE_FIELD = "passphrase"
RETIRED_FIELD = re.compile(r"^owner-recipient-retired/[0-9a-f]{16}\.key$")


def block_value(owner_dir: str | Path, *, passphrase: str | None = None) -> dict:
    """The Secret block value for the keyring in ``owner_dir`` (what `keys secret-block` saves)."""
    folder = Path(owner_dir)
    try:
        value = {name: (folder / name).read_text() for name in KEYRING_FILES}
        value[SITES_FILE] = json.loads((folder / SITES_FILE).read_text())
        for path in sorted(folder.glob("owner-recipient-retired/*.key")):
            value[f"{path.parent.name}/{path.name}"] = path.read_text()
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"owner keyring {str(folder)!r} is incomplete or unreadable ({type(err).__name__}); "
            "create it with `adaloc keys owner-init`"
        ) from None
    if passphrase:
        value[PASSPHRASE_FIELD] = passphrase
    return value


def keyring_from_block(name: str, directory: str | Path):
    """Write the keyring held by Secret block ``name`` into ``directory`` (0600 files) and
    open it; ConfigError (one line) when the block is missing or lacks a keyring file."""
    from prefect.blocks.system import Secret

    from registry.fsutil import atomic_write_bytes, atomic_write_json, private_dir
    from registry.keyring import OwnerKeyring

    try:
        value = Secret.load(name).get()
    except ValueError:
        raise ConfigError(
            f"Prefect Secret block {name!r} not found; save it with `adaloc keys secret-block`"
        ) from None
    missing = [
        f for f in (*KEYRING_FILES, SITES_FILE) if not isinstance(value, dict) or f not in value
    ]
    if missing:
        raise ConfigError(f"Prefect Secret block {name!r} lacks {missing} (an owner keyring)")
    folder = private_dir(Path(directory))
    for f in KEYRING_FILES:
        atomic_write_bytes(folder / f, str(value[f]).encode(), mode=0o600)
    atomic_write_json(folder / SITES_FILE, value[SITES_FILE], mode=0o600)
    for field in filter(RETIRED_FIELD.match, value):  # hex names only: no path games
        private_dir(folder / field.split("/")[0])
        atomic_write_bytes(folder / field, str(value[field]).encode(), mode=0o600)
    passphrase = value.get(PASSPHRASE_FIELD)
    return OwnerKeyring(folder, passphrase=passphrase.encode() if passphrase else None)
