"""One set of defaults for every entry point: the flows, the demo, ``adaloc registry|site|keys``
and ``adaloc serve``.

Each default is written here once; environment variables override it with the usual names
(``MLFLOW_TRACKING_URI``, ``MLFLOW_REGISTRY_URI``, ``MLFLOW_S3_ENDPOINT_URL``) or an
``ADALOC_*`` name. With no tracking URI every entry point uses the same embedded store:
``HOME/mlflow.db`` + ``HOME/artifacts`` (HOME = ``runs``), and the owner's keyring is
``HOME/owner``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

# Environment variable names per setting, first match wins. The CLI options use the same
# tuples (typer ``envvar=``), so a variable means the same thing to every command.
ENV: dict[str, tuple[str, ...]] = {
    "home": ("ADALOC_HOME",),
    "tracking_uri": ("ADALOC_TRACKING_URI", "MLFLOW_TRACKING_URI"),
    "registry_uri": ("ADALOC_REGISTRY_URI", "MLFLOW_REGISTRY_URI"),
    "s3_endpoint": ("MLFLOW_S3_ENDPOINT_URL",),
    "model_name": ("ADALOC_MODEL",),
    "owner_dir": ("ADALOC_OWNER_DIR",),
    "key_cache": ("ADALOC_KEY_CACHE",),
    "site_dir": ("ADALOC_SITE_DIR",),
}


def _alias(name: str) -> AliasChoices:
    return AliasChoices(*ENV[name])


class Settings(BaseSettings):
    """Where the registry, the owner's keyring and the site live, and the model's name."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    home: Path = Field(Path("runs"), validation_alias=_alias("home"))
    tracking_uri: str = Field("", validation_alias=_alias("tracking_uri"))
    registry_uri: str = Field("", validation_alias=_alias("registry_uri"))
    s3_endpoint: str = Field("", validation_alias=_alias("s3_endpoint"))
    model_name: str = Field(
        "adaloc-fashion-mnist", min_length=1, validation_alias=_alias("model_name")
    )
    owner_dir: Path | None = Field(None, validation_alias=_alias("owner_dir"))
    # Plain key versions cached in OWNER_DIR/keys; off on workers that must hold none.
    key_cache: bool = Field(True, validation_alias=_alias("key_cache"))
    site_dir: Path = Field(Path("site"), validation_alias=_alias("site_dir"))

    @property
    def owner(self) -> Path:
        """The owner's keyring folder (``HOME/owner`` unless set)."""
        return self.owner_dir or self.home / "owner"

    def embedded(self) -> tuple[str, str]:
        """The embedded store's (sqlite tracking URI, artifact location) under ``home``."""
        root = self.home.resolve()
        return f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri()

    def registry_location(self) -> tuple[str, str | None]:
        """(tracking URI, artifact location for a new experiment): the server's, or the
        embedded store's when no tracking URI is set."""
        if self.tracking_uri:
            return self.tracking_uri, None
        return self.embedded()


DEFAULTS = Settings.model_construct()  # the written defaults, no environment read


def load_settings() -> Settings:
    """Read the environment once (at an entry point); a bad value is one ConfigError line."""
    from adaloc.errors import ConfigError

    try:
        return Settings()
    except ValidationError as err:
        first = err.errors()[0]
        raise ConfigError(
            f"environment setting {'.'.join(map(str, first['loc']))}: {first['msg']}"
        ) from None
