"""One validated pipeline config: a file (TOML, YAML or JSON) plus ``key=value`` overrides.

Every flow takes a :class:`PipelineConfig` (a pydantic model, so Prefect validates it as a
flow parameter), prints it and logs it (as ``config.json``) with its MLflow run, so a key
version always carries the settings that made it. ``adaloc config --help-fields`` lists the
fields. Adding a field is one line: ``name: type = Field(default, description="...")``.
"""

from __future__ import annotations

import json
import tomllib
import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from adaloc.errors import ConfigError

CONFIG_FORMAT_VERSION = 1
# The Literal choices mirror adaloc's tuples (models.MODEL_NAMES, token.PATTERNS without
# "image", tokenlock.STRATEGIES); tests/pipelines/test_config.py checks they agree.
ModelName = Literal["cnn", "mlp", "resnet18", "densenet121", "convnext_tiny"]
Optimizer = Literal["sgd", "adamw", "adam"]
TokenPattern = Literal[
    "", "pixel", "dots3x3-diagonal", "dots3x3-die5", "square3x3", "patch4x4-rgb", "binary"
]
TokenStrategy = Literal[
    "single_target", "random_target", "uniform_distribution", "next_class", "uniform_except_true"
]
DATASET_PATTERN = r"^(fashion-mnist|digits|cifar100|flowers102|caltech256|imagefolder:.+)$"
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"


def describe(err: ValidationError, what: str = "config") -> str:
    """A pydantic error as one line naming each bad field and the value it got."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = e["msg"].removeprefix("Value error, ")
        got = "" if e["type"] == "missing" else f" (got {e['input']!r})"
        parts.append(f"{what} field {loc!r}: {msg}{got}")
    return "; ".join(parts)


class VersionedConfig(BaseModel):
    """The rule for every saved config, written once: it carries ``format_version``; unknown
    keys (from newer versions) warn and are dropped; bad values raise ConfigError naming
    the field."""

    model_config = ConfigDict(extra="ignore", validate_assignment=True)
    FORMAT_VERSION: ClassVar[int] = CONFIG_FORMAT_VERSION

    format_version: int = Field(CONFIG_FORMAT_VERSION, ge=1, description="config format version")

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise ConfigError(describe(err)) from None

    @model_validator(mode="before")
    @classmethod
    def _unknown_keys_warn(cls, data: Any) -> Any:
        if isinstance(data, dict):
            extra = sorted(set(data) - set(cls.model_fields))
            if extra:
                warnings.warn(f"ignoring unknown config fields {extra}", stacklevel=2)
            version = data.get("format_version", cls.FORMAT_VERSION)
            if isinstance(version, int) and version > cls.FORMAT_VERSION:
                warnings.warn(
                    f"config format_version {version} is newer than {cls.FORMAT_VERSION}; "
                    "unknown fields are ignored",
                    stacklevel=2,
                )
        return data

    def to_dict(self) -> dict:
        """Plain dict, JSON-ready, with the format version."""
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        """Indented JSON text (what is logged with each run)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_toml(self) -> str:
        """TOML text that :func:`load_config` reads back to an equal config."""
        import tomlkit

        return tomlkit.dumps(self.to_dict())


class PipelineConfig(VersionedConfig):
    """Settings shared by the lock, update, evaluate and retrain flows (and the demo)."""

    name: str = Field(
        "adaloc-fashion-mnist",
        min_length=1,
        description="registered model prefix: <name>-base and <name>-key",
    )
    dataset: str = Field(
        "fashion-mnist",
        pattern=DATASET_PATTERN,
        description="fashion-mnist | digits | cifar100 | flowers102 | caltech256 | "
        "imagefolder:PATH",
    )
    data_root: str = Field("data", description="directory the dataset is read from (DVC)")
    dvc_file: str = Field("data.dvc", description="DVC file whose md5 is the data version")
    model: ModelName = Field("cnn", description="model builder")
    key: dict = Field(
        default_factory=dict,
        description="KeySpec fields (budget, selection, granularity, seed, ...)",
    )
    epochs: int = Field(2, ge=1, description="epochs of base training in the lock flow")
    key_epochs: int = Field(
        2, ge=1, description="floor on key-only epochs (adaloc's UpdateRecipe picks the budget)"
    )
    batch_size: int = Field(128, ge=1, description="training batch size")
    optimizer: Optimizer = Field(
        "sgd", description="optimizer of base training (key-only: adaloc's UpdateRecipe)"
    )
    lr: float = Field(
        0.0,
        ge=0.0,
        description="learning rate; 0 = the defaults: adaloc's UpdateRecipe (Adam 0.01) for "
        "key-only updates, adaloc TrainConfig's 0.05 for base training",
    )
    updates: int = Field(2, ge=1, description="number of update stages the data is split into")
    train_limit: int = Field(0, ge=0, description="cap on training images per stage (0 = all)")
    test_limit: int = Field(0, ge=0, description="cap on test images for evaluation (0 = all)")
    seed: int = Field(0, ge=0, description="seed for data stages, training and key fill")
    device: str = Field("auto", pattern=DEVICE_PATTERN, description="auto | cpu | cuda | cuda:N")
    authorized_threshold: float = Field(
        0.70, ge=0.0, le=1.0, description="gate: authorized accuracy >= this (0..1)"
    )
    unauthorized_margin: float = Field(
        0.02, ge=0.0, lt=1.0, description="gate: unauthorized accuracy <= chance + this"
    )
    max_attack_leak_pt: float = Field(
        0.0, ge=0.0, description="gate: attack leak at 1%/5% of the data (points) <= this; 0 = off"
    )
    tracking_uri: str = Field(
        "", description="MLflow tracking URI; empty = MLFLOW_TRACKING_URI or the embedded store"
    )
    artifact_location: str = Field("", description="artifact root of a new experiment (dir/s3)")
    s3_endpoint: str = Field(
        "",
        description="S3 endpoint URL of MLflow's artifact store (sets MLFLOW_S3_ENDPOINT_URL; "
        "DVC's remote is configured in .dvc/config)",
    )
    owner_dir: str = Field("", description="owner keyring folder; empty = ADALOC_HOME/owner")
    owner_secret_block: str = Field(
        "",
        description="Prefect Secret block holding the owner keyring (`adaloc keys "
        "secret-block`); empty = the keyring folder owner_dir",
    )
    key_cache: Literal["", "on", "off"] = Field(
        "",
        description="keep plain key versions in OWNER_DIR/keys, a cache (the registry holds "
        "the owner's sealed copy); empty = ADALOC_KEY_CACHE (default on)",
    )
    token: TokenPattern = Field(
        "", description="M-LOCK token pattern for a two-factor lock; empty = off"
    )
    token_size: int = Field(
        0, ge=0, description="token side in pixels; 0 = the pattern's default (binary: 12x12)"
    )
    token_strategy: TokenStrategy = Field(
        "single_target", description="M-LOCK label strategy for unstamped inputs"
    )
    token_decoys: float = Field(
        0.5, ge=0.0, le=1.0, description="share of unstamped samples carrying a decoy token"
    )

    @field_validator("key")
    @classmethod
    def _key_spec_is_valid(cls, value: dict) -> dict:
        from adaloc.keys import KeySpec

        KeySpec.from_dict(value)  # adaloc's own checks; its ConfigError names the field
        return value

    def key_spec(self):
        """The :class:`adaloc.keys.KeySpec` this config asks for: ``key``'s fields over the
        library's rule (:func:`adaloc.keys.default_rule`). With norm layers: data-aware
        ``saliency`` rows (besides every norm layer, the head and the stem); a norm-free
        ``mlp``: ``first`` (the earliest layer's rows), which the lock flow's hardening
        (:func:`adaloc.harden.harden_default`) makes the carrier of the features."""
        from adaloc.keys import KeySpec, default_rule, norm_free

        return KeySpec.from_dict({**default_rule(norm_free(self.model)), **self.key})

    @property
    def caches_keys(self) -> bool:
        """True unless the key cache is off (unresolved "" counts as the default, on)."""
        return self.key_cache != "off"

    def replace(self, **changes: Any) -> PipelineConfig:
        """A validated copy with some fields changed."""
        return from_dict({**self.to_dict(), **changes})

    def resolved(self, settings=None) -> PipelineConfig:
        """With the shared defaults filled in (:mod:`pipelines.settings`): no tracking URI =
        ``MLFLOW_TRACKING_URI`` or the embedded store (``runs/mlflow.db`` + ``runs/artifacts``);
        no owner folder = ``runs/owner``. A tracking server with no artifact location keeps
        the server's own artifact store."""
        from pipelines.settings import load_settings

        s = settings or load_settings()
        changes: dict[str, Any] = {}
        if not self.tracking_uri:
            uri, location = s.registry_location()
            changes["tracking_uri"] = uri
            if location and not self.artifact_location:
                changes["artifact_location"] = location
                s.home.mkdir(parents=True, exist_ok=True)
        if not self.owner_dir:
            changes["owner_dir"] = str(s.owner.resolve())
        if not self.key_cache:
            changes["key_cache"] = "on" if s.key_cache else "off"
        if not self.s3_endpoint and s.s3_endpoint:
            changes["s3_endpoint"] = s.s3_endpoint
        return self.replace(**changes) if changes else self


def field_help() -> list[tuple[str, str, str, str]]:
    """(name, type, default, description) of every config field (``--help-fields``)."""
    rows = []
    for name, f in PipelineConfig.model_fields.items():
        default = f.get_default(call_default_factory=True)
        kind = getattr(f.annotation, "__name__", None) or str(f.annotation).replace("typing.", "")
        rows.append((name, kind, json.dumps(default), f.description or ""))
    return rows


def from_dict(data: dict) -> PipelineConfig:
    """Build a config from a dict; unknown keys warn (newer versions), bad values fail."""
    if not isinstance(data, dict):
        raise ConfigError(f"config should be a table of fields, got {type(data).__name__}")
    return PipelineConfig(**data)


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


def _merge(data: dict, changes: dict | None) -> dict:
    """``changes`` over ``data``; a ``key`` table merges field by field; None = unset."""
    out = dict(data)
    for name, value in (changes or {}).items():
        if value is None:
            continue
        if name == "key" and isinstance(value, dict):
            out["key"] = {**out.get("key", {}), **value}
        else:
            out[name] = value
    return out


def load_config(
    path: str | Path | None = None,
    overrides: dict | list[str] | None = None,
    *,
    defaults: dict | None = None,
) -> PipelineConfig:
    """``defaults`` < the config file (optional) < ``overrides`` (dict or ``field=value``)."""
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    data = _merge(defaults or {}, _read_file(Path(path)) if path else {})
    return from_dict(_merge(data, overrides))
