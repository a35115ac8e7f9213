"""`adaloc keys ...`: the owner's signing key (optionally passphrase-encrypted) and sites.

The passphrase of an encrypted owner.key is read from ``ADALOC_OWNER_PASSPHRASE`` or the
file / pipe / ``/dev/fd/N`` named by ``ADALOC_OWNER_PASSPHRASE_FILE`` (flows use the same),
or from ``--passphrase-file``; it is never a command-line value (``ps`` would show it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pipelines.registry_cli import AsJson, OwnerDir, _emit, cli_errors, out
from pipelines.settings import DEFAULTS

keys_app = typer.Typer(help="Owner signing key and the list of authorised sites.")


PassphraseFile = Annotated[
    Path | None,
    typer.Option(
        "--passphrase-file",
        help="Encrypt owner.key with the passphrase in this file (or pipe, /dev/fd/N).",
    ),
]


def _new_passphrase(encrypt: bool, passphrase_file: Path | None) -> bytes | None:
    """The passphrase to encrypt a new owner.key with: file, environment, or a prompt."""
    from registry.keyfiles import passphrase_from_env, read_passphrase_file

    if passphrase_file is not None:
        return read_passphrase_file(passphrase_file)
    if not encrypt:
        return None
    from_env = passphrase_from_env()
    if from_env:
        return from_env
    text = typer.prompt("owner key passphrase", hide_input=True, confirmation_prompt=True)
    if not text:
        from registry.errors import BadFileError

        raise BadFileError("an empty passphrase cannot encrypt owner.key")
    return text.encode()


@keys_app.command("owner-init")
@cli_errors
def keys_owner_init(
    directory: OwnerDir = DEFAULTS.owner,
    force: Annotated[bool, typer.Option("--force", help="Replace existing owner keys.")] = False,
    encrypt: Annotated[
        bool,
        typer.Option(
            "--encrypt",
            help="Encrypt owner.key; passphrase from ADALOC_OWNER_PASSPHRASE(_FILE) or a prompt.",
        ),
    ] = False,
    passphrase_file: PassphraseFile = None,
    as_json: AsJson = False,
) -> None:
    """Create the owner's Ed25519 signing key (owner.key 0600), X25519 recipient key
    (owner-recipient.key 0600: every key version is sealed for it too) and an empty site list."""
    from registry.keyring import OwnerKeyring
    from registry.sealing import key_fingerprint

    passphrase = _new_passphrase(encrypt, passphrase_file)
    keyring = OwnerKeyring.init(directory, overwrite=force, passphrase=passphrase)
    info = {
        "directory": str(directory),
        "owner_key": key_fingerprint(keyring.owner_public_pem),
        "recipient_key": key_fingerprint(keyring.recipient_public_pem()),
        "encrypted": passphrase is not None,
    }
    _emit(
        info,
        as_json,
        lambda d: out.print(
            f"owner key {d['owner_key']} in {d['directory']}"
            + (" (encrypted)" if d["encrypted"] else "")
        ),
    )


@keys_app.command("owner-check")
@cli_errors
def keys_owner_check(directory: OwnerDir = DEFAULTS.owner, as_json: AsJson = False) -> None:
    """Check every owner file: owner.key opens (passphrase from the environment) and matches
    owner.pub, sites.json parses, token.json and the kept keys/key-v*.safetensors load."""
    from adaloc.artifact import load_key
    from adaloc.token import Token
    from registry.errors import BadFileError
    from registry.keyfiles import OWNER_PRIVATE_FILE, is_encrypted, key_fingerprint, public_pem_of
    from registry.keyring import OwnerKeyring

    keyring = OwnerKeyring(directory)
    pub = keyring.owner_public_pem
    if public_pem_of(keyring.signing_key()) != pub:
        raise BadFileError(f"{directory}/owner.key and owner.pub are not one key pair")
    token = Path(directory) / "token.json"
    keys = sorted((Path(directory) / "keys").glob("key-v*.safetensors"))
    for path in keys:
        load_key(path)
    info = {
        "directory": str(directory),
        "owner_key": key_fingerprint(pub),
        "encrypted": is_encrypted(Path(directory) / OWNER_PRIVATE_FILE),
        "sites": len(keyring.sites()),
        "token": Token.load(token).fingerprint()[:12] if token.exists() else None,
        "kept_keys": len(keys),
    }
    _emit(
        info,
        as_json,
        lambda d: out.print(
            f"owner key {d['owner_key']} OK ({d['sites']} sites, {d['kept_keys']} kept keys"
            + (", token" if d["token"] else "")
            + ")"
        ),
    )


@keys_app.command("secret-block")
@cli_errors
def keys_secret_block(
    name: Annotated[str, typer.Argument(help="Name of the Prefect Secret block to save.")],
    directory: OwnerDir = DEFAULTS.owner,
    with_passphrase: Annotated[
        bool,
        typer.Option(
            "--with-passphrase",
            help="Also store the passphrase (from ADALOC_OWNER_PASSPHRASE(_FILE)) in the block.",
        ),
    ] = False,
    as_json: AsJson = False,
) -> None:
    """Save the owner keyring as a Prefect Secret block, for flows with owner_secret_block."""
    from prefect.blocks.system import Secret

    from pipelines.owner_secrets import block_value
    from registry.keyfiles import passphrase_from_env

    passphrase = passphrase_from_env() if with_passphrase else None
    if with_passphrase and not passphrase:
        from registry.errors import BadFileError

        raise BadFileError("--with-passphrase: set ADALOC_OWNER_PASSPHRASE(_FILE) first")
    value = block_value(directory, passphrase=passphrase.decode() if passphrase else None)
    Secret(value=value).save(name, overwrite=True)
    info = {"block": name, "directory": str(directory), "passphrase": bool(passphrase)}
    _emit(info, as_json, lambda d: out.print(f"saved the owner keyring as Secret {d['block']!r}"))


@keys_app.command("site-add")
@cli_errors
def keys_site_add(
    site_id: Annotated[str, typer.Argument(help="Site id (as given to `site init`).")],
    public_key: Annotated[Path, typer.Argument(help="The site's site.pub.")],
    directory: OwnerDir = DEFAULTS.owner,
    as_json: AsJson = False,
) -> None:
    """Authorise a site: later key versions are sealed for it."""
    from registry.keyring import OwnerKeyring

    entry = OwnerKeyring(directory).add_site(site_id, public_key).to_dict(with_key=False)
    _emit(entry, as_json, lambda d: out.print(f"added site {d['site_id']} ({d['fingerprint']})"))


@keys_app.command("site-ls")
@cli_errors
def keys_site_ls(directory: OwnerDir = DEFAULTS.owner, as_json: AsJson = False) -> None:
    """List authorised and revoked sites."""
    from registry.keyring import OwnerKeyring

    rows = [s.to_dict(with_key=False) for s in OwnerKeyring(directory).sites()]

    def render(rows: list[dict]) -> None:
        table = Table(title="sites")
        for col in ("site", "fingerprint", "added", "revoked"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["site_id"], r["fingerprint"], r["added_at"], r["revoked_at"] or "-")
        out.print(table)

    _emit(rows, as_json, render)


@keys_app.command("site-revoke")
@cli_errors
def keys_site_revoke(
    site_id: Annotated[str, typer.Argument(help="Site id to revoke.")],
    directory: OwnerDir = DEFAULTS.owner,
    as_json: AsJson = False,
) -> None:
    """Revoke a site: key versions published from now on are not sealed for it."""
    from registry.keyring import OwnerKeyring

    entry = OwnerKeyring(directory).revoke_site(site_id).to_dict(with_key=False)
    _emit(entry, as_json, lambda d: out.print(f"revoked site {d['site_id']} at {d['revoked_at']}"))
