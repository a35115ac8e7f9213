"""One validated pipeline config: a file (TOML, YAML or JSON) plus ``key=value`` overrides.

Every flow takes a :class:`PipelineConfig`, prints it and logs it (as ``config.json``) with
its MLflow run, so a key version always carries the settings that made it.
"""

from __future__ import annotations

import json
import tomllib
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from adaloc.errors import ConfigError

CONFIG_FORMAT_VERSION = 1
DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("sgd", "adamw", "adam")
_ESSENTIAL = ("name", "dataset", "model")


def _help(text: str, default: Any) -> Any:
    """A dataclass field with help text (shown by ``adaloc config --help-fields``)."""
    if isinstance(default, dict | list):
        return field(default_factory=lambda: type(default)(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class PipelineConfig:
    """Settings shared by the lock, update, evaluate and retrain flows (and the demo)."""

    name: str = _help("registered model prefix: <name>-base and <name>-key", "adaloc-fmnist")
    dataset: str = _help(
        "fashion-mnist | digits | cifar100 | ... | imagefolder:PATH", "fashion-mnist"
    )
    data_root: str = _help("directory the dataset is read from (tracked by DVC)", "data")
    dvc_file: str = _help("DVC file whose md5 is the data version", "data.dvc")
    model: str = _help("model builder: cnn | mlp | resnet18 | densenet121 | convnext_tiny", "cnn")
    key: dict = _help("KeySpec fields (budget, selection, granularity, seed, ...)", {})
    epochs: int = _help("epochs of base training in the lock flow", 2)
    key_epochs: int = _help("epochs of key-only training per key version", 2)
    batch_size: int = _help("training batch size", 128)
    optimizer: str = _help("sgd | adamw | adam", "sgd")
    lr: float = _help("learning rate (0 = the training module's default)", 0.0)
    updates: int = _help("number of update stages the data is split into", 2)
    train_limit: int = _help("cap on training images per stage (0 = all)", 0)
    test_limit: int = _help("cap on test images used for evaluation (0 = all)", 0)
    seed: int = _help("seed for data stages, training and key fill", 0)
    device: str = _help("auto | cpu | cuda | cuda:N", "auto")
    authorized_threshold: float = _help("gate: authorized accuracy >= this (0..1)", 0.70)
    unauthorized_margin: float = _help("gate: unauthorized accuracy <= chance + this", 0.02)
    tracking_uri: str = _help("MLflow tracking URI (sqlite:///..., http://...)", "")
    artifact_location: str = _help("artifact root for a new experiment (dir or s3://)", "")
    s3_endpoint: str = _help("S3 endpoint URL for artifacts and the DVC s3 remote", "")
    owner_dir: str = _help("owner signing key pair directory", "")
    token: str = _help("M-LOCK token pattern for a two-factor lock (e.g. binary); empty = off", "")
    token_size: int = _help(
        "token side in pixels; 0 = the pattern's default (binary: 12x12 = 144 random bits)", 0
    )
    token_strategy: str = _help("M-LOCK label strategy for unstamped inputs", "single_target")
    token_decoys: float = _help("share of unstamped samples carrying a decoy token", 0.5)
    format_version: int = _help("config format version", CONFIG_FORMAT_VERSION)

    def __post_init__(self) -> None:
        for name in _ESSENTIAL:
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"config {name!r} should be a non-empty string")
        for name in ("epochs", "key_epochs", "batch_size", "updates"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"config {name!r} should be a positive integer, got {value!r}")
        for name in ("train_limit", "test_limit", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"config {name!r} should be an integer >= 0, got {value!r}")
        if not 0.0 <= float(self.authorized_threshold) <= 1.0:
            raise ConfigError(
                f"authorized_threshold is a fraction in [0, 1], got {self.authorized_threshold!r}"
            )
        if not 0.0 <= float(self.unauthorized_margin) < 1.0:
            raise ConfigError(
                f"unauthorized_margin is a fraction in [0, 1), got {self.unauthorized_margin!r}"
            )
        if self.token_size < 0 or not 0.0 <= float(self.token_decoys) <= 1.0:
            raise ConfigError(
                f"token_size should be >= 0 and token_decoys in [0, 1], got "
                f"{self.token_size!r} and {self.token_decoys!r}"
            )
        if float(self.lr) < 0:
            raise ConfigError(f"lr should be >= 0, got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer {self.optimizer!r} is unknown; use one of {OPTIMIZERS}")
        if self.device.split(":")[0] not in DEVICES:
            raise ConfigError(f"device {self.device!r} is unknown; use auto, cpu, cuda or cuda:N")
        if not isinstance(self.key, dict):
            raise ConfigError(f"config 'key' should be a table of KeySpec fields, got {self.key!r}")
        if self.format_version > CONFIG_FORMAT_VERSION:
            warnings.warn(
                f"config format_version {self.format_version} is newer than "
                f"{CONFIG_FORMAT_VERSION}; unknown fields are ignored",
                stacklevel=2,
            )
        self.key_spec()  # validates the key table through adaloc's own checks

    def key_spec(self):
        """The :class:`adaloc.keys.KeySpec` this config asks for."""
        from adaloc.keys import KeySpec

        return KeySpec.from_dict(self.key)

    def to_dict(self) -> dict:
        """Plain dict, JSON-ready, with the format version."""
        return asdict(self)

    def to_json(self) -> str:
        """Indented JSON text (what is logged with each run)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> PipelineConfig:
        """A validated copy with some fields changed."""
        return from_dict({**self.to_dict(), **changes})

    def resolved(self, base: str | Path = ".") -> PipelineConfig:
        """With no tracking URI, the embedded default under ``base`` (local SQLite + a local
        artifact directory); the owner's keyring defaults to ``base/owner``. A tracking server
        with no artifact location keeps the server's own artifact store."""
        base = Path(base).resolve()
        changes: dict[str, Any] = {}
        if not self.tracking_uri:
            changes["tracking_uri"] = f"sqlite:///{base / 'mlflow.db'}"
            if not self.artifact_location:
                changes["artifact_location"] = (base / "artifacts").as_uri()
        if not self.owner_dir:
            changes["owner_dir"] = str(base / "owner")
        if changes:
            base.mkdir(parents=True, exist_ok=True)
        return self.replace(**changes) if changes else self


def from_dict(data: dict) -> PipelineConfig:
    """Build a config from a dict; unknown keys warn (newer versions), bad values fail."""
    known = {f.name for f in fields(PipelineConfig)}
    extra = sorted(set(data) - known)
    if extra:
        warnings.warn(f"ignoring unknown config fields {extra}", stacklevel=2)
    try:
        return PipelineConfig(**{k: v for k, v in data.items() if k in known})
    except TypeError as err:
        raise ConfigError(f"config is malformed: {err}") from err


def _read_file(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            return tomllib.loads(text)
        if suffix == ".json":
            return json.loads(text)
        if suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text) or {}
    except (ValueError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"config file {str(path)!r} cannot be parsed: {err}") from err
    raise ConfigError(f"config file {str(path)!r} should end in .toml, .yaml, .yml or .json")


def _parse_value(text: str) -> Any:
    """``"3"`` -> 3, ``"0.5"`` -> 0.5, ``"true"`` -> True, JSON tables, else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(items: list[str] | None) -> dict:
    """``["epochs=1", "key.budget=0.03"]`` -> ``{"epochs": 1, "key": {"budget": 0.03}}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} should look like field=value")
        name, _, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if name.startswith("key."):
            out.setdefault("key", {})[name[4:]] = _parse_value(value)
        else:
            out[name] = _parse_value(value)
    return out


def load_config(path: str | Path | None = None, overrides: dict | list[str] | None = None):
    """Read a config file (optional) and apply overrides (dict or ``field=value`` strings)."""
    data: dict[str, Any] = _read_file(Path(path)) if path else {}
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        if name == "key" and isinstance(value, dict):
            data["key"] = {**data.get("key", {}), **value}
        else:
            data[name] = value
    return from_dict(data)
