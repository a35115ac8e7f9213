"""Property-based fuzzing of every reader of untrusted or local bytes (hypothesis).

Random bytes, random JSON and bit-flipped valid files go into: the sealed-blob reader, the
key and base safetensors readers, model.json, token.json, the owner keyring files, the
signed trust records and the site's state files. Each must raise its typed error (or, for
an unsigned format, return a valid object), never another exception, never hang (each
example has a deadline) and never write a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaloc.artifact import ModelCard, decode_base, decode_key, encode_base, encode_key, load_base
from adaloc.errors import KeyFormatError, TokenError
from adaloc.keys import KeySpec, select_key
from adaloc.lock import lock
from adaloc.models import build_model
from adaloc.token import Token
from registry import site_files as F
from registry import trust as T
from registry.errors import BadFileError, NotFoundError, RegistryError, TrustError
from registry.keyfiles import _private_pem, _public_pem, public_pem_of
from registry.keyring import OwnerKeyring
from registry.sealing import open_sealed, read_header, seal, verify_sealed

FUZZ = settings(
    max_examples=60,
    deadline=2000,  # ms per example: a reader that loops or balloons fails here
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,  # the same examples on every run: a failure is reproducible in CI
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
DEEP = b"[" * 100_000 + b"]" * 100_000  # nesting deep enough to blow a naive recursion

OWNER = Ed25519PrivateKey.generate()
OWNER_PUB = public_pem_of(OWNER)
SITE = X25519PrivateKey.generate()
SITE_PUB = _public_pem(SITE.public_key())
HEADER = {"key_version": 1, "parent": None, "base_sha256": "a" * 64, "model_sha256": None}
BLOB = seal({"key": b"k" * 40, "token": b"t" * 9}, header=HEADER,
            recipients={"lab": SITE_PUB}, signing_key=OWNER)  # fmt: skip


def _tiny_key_and_base():
    torch.manual_seed(0)
    model = build_model("mlp", in_channels=1, num_classes=3, image_size=8, hidden=(8,))
    base, key = lock(model, select_key(model, KeySpec(budget=0.2, seed=0)))
    return encode_key(key), encode_base(base)


KEY_BYTES, BASE_BYTES = _tiny_key_and_base()
CARD = ModelCard("mlp", {"in_channels": 1, "num_classes": 3, "image_size": 8, "hidden": [8]},
                 3, [1, 8, 8]).to_json().encode()  # fmt: skip
TOKEN_BYTES = Token.generate().to_bytes()


def _flip(data: bytes, positions: list[int]) -> bytes:
    out = bytearray(data)
    for p in positions:
        out[p % len(out)] ^= 1 << (p % 8)
    return bytes(out)


def flips(data: bytes):
    """Strategy: ``data`` with 1-3 bits flipped anywhere."""
    return st.lists(st.integers(0, 8 * len(data) - 1), min_size=1, max_size=3).map(
        lambda ps: _flip(data, [p // 8 for p in ps])
    )


def mangled(data: bytes):
    """Strategy: random bytes, random JSON, bit flips, truncations and splices of ``data``."""
    return st.one_of(
        st.binary(max_size=512),
        JSON_VALUES.map(lambda v: json.dumps(v).encode()),
        flips(data),
        st.integers(0, len(data)).map(lambda n: data[:n]),
        st.tuples(st.integers(0, len(data)), st.binary(max_size=64)).map(
            lambda t: data[: t[0]] + t[1] + data[t[0] :]
        ),
        st.just(DEEP),
    )


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@FUZZ
@given(mangled(BLOB))
def test_sealed_blob_reader(blob):
    with contextlib.suppress(RegistryError):
        read_header(blob)
    if blob == BLOB:
        return
    with pytest.raises(RegistryError):  # any change at all breaks the owner's signature
        verify_sealed(blob, OWNER_PUB)
    with pytest.raises(RegistryError):
        open_sealed(blob, site_id="lab", site_private_key=SITE, owner_public_pem=OWNER_PUB)


@FUZZ
@given(mangled(OWNER_PUB))
def test_owner_public_key_given_to_the_blob_reader(pem):
    with contextlib.suppress(RegistryError):
        verify_sealed(BLOB, pem)


@FUZZ
@given(mangled(KEY_BYTES))
def test_key_reader(data):
    # unsigned format: a flip may still decode; never another error
    with contextlib.suppress(KeyFormatError):
        decode_key(data)


@FUZZ
@given(mangled(BASE_BYTES))
def test_base_reader(data):
    with contextlib.suppress(KeyFormatError):
        decode_base(data)


@FUZZ
@given(mangled(CARD), mangled(BASE_BYTES))
def test_base_folder_with_model_json(card, base):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "model.json").write_bytes(card)
        (d / "base.safetensors").write_bytes(base)
        before = _tree(d)
        with contextlib.suppress(KeyFormatError):
            load_base(d)
        assert _tree(d) == before


@FUZZ
@given(mangled(TOKEN_BYTES))
def test_token_reader(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "token.json"
        path.write_bytes(data)
        with contextlib.suppress(TokenError):
            Token.load(path)
        assert _tree(Path(tmp)) == {"token.json": hashlib.sha256(data).hexdigest()}


_KEYRING = tempfile.mkdtemp(prefix="fuzz-keyring-")
OwnerKeyring.init(_KEYRING).add_site("lab", SITE_PUB)
# A current keyring (with the owner recipient key): an older one gains it on its next seal,
# a migration that is not a change made by bad input.
_KEYRING_FILES = {n: (Path(_KEYRING) / n).read_bytes() for n in ("owner.key", "owner.pub",
                  "owner-recipient.key", "owner-recipient.pub", "sites.json")}  # fmt: skip


@FUZZ
@given(st.sampled_from(sorted(_KEYRING_FILES)), st.data())
def test_owner_keyring_files(name, data):
    content = data.draw(mangled(_KEYRING_FILES[name]))
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for n, b in _KEYRING_FILES.items():
            (d / n).write_bytes(content if n == name else b)
        before = _tree(d)
        keyring = OwnerKeyring(d)
        calls = (lambda: keyring.owner_public_pem, keyring.sites, keyring.signing_key,
                 keyring.recipient_key, lambda: keyring.seal({"key": b"x"}, HEADER))  # fmt: skip
        for call in calls:
            with contextlib.suppress(BadFileError, NotFoundError, RegistryError):
                call()
        assert _tree(d) == before


ROOT_ENV = T.sign(T.make_root("fuzz", [OWNER]), [OWNER])
ROOT_BYTES = T.canonical(ROOT_ENV)
ROOT_KEYS = T.root_keys(T.verify(ROOT_ENV, "root", {}, 0, "root"))


@FUZZ
@given(mangled(ROOT_BYTES))
def test_signed_trust_record(data):
    try:
        record = T.verify(T.parse(data, "root", "root"), "root", ROOT_KEYS, 1, "root")
    except TrustError:
        return
    assert record.version == 1
    assert json.loads(data)["signed"] == ROOT_ENV["signed"]  # only an equivalent record passes


SITE_MODELS = {
    "site.json": (
        F.SiteConfig,
        {"site_id": "lab", "tracking_uri": "sqlite:///x.db", "model_name": "m"},
    ),  # fmt: skip
    "seen.json": (F.Seen, {"counter": 3}),
    "available.json": (F.Available, {}),
    "state.json": (F.InstallState, {"version": 1}),
}


@FUZZ
@given(st.sampled_from(sorted(SITE_MODELS)), st.data())
def test_site_state_files(name, data):
    model, sample = SITE_MODELS[name]
    content = data.draw(mangled(json.dumps(sample).encode()))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(content)
        with contextlib.suppress(BadFileError):
            F.read_model(path, model, name)
        assert _tree(Path(tmp)) == {name: hashlib.sha256(content).hexdigest()}


@FUZZ
@given(mangled(SITE_PUB), mangled(_private_pem(SITE)))
def test_site_key_files(pub, priv):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "site.key").write_bytes(priv)
        with contextlib.suppress(BadFileError):
            F.load_site_key(Path(tmp) / "site.key")
        with contextlib.suppress(BadFileError):
            F.check_owner_pem(pub, "owner.pub")
