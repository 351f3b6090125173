"""Platform settings: the one documented place for them. Each field is read from the environment
variable `FEDSEEK_<FIELD>` (e.g. `FEDSEEK_DB_URL`), else the default below.

| variable | default | meaning |
|---|---|---|
| FEDSEEK_HOME | ~/.fedseek | platform state: DB, local MLflow store, tracking outbox, round checkpoints |
| FEDSEEK_DB_URL | sqlite:///$FEDSEEK_HOME/fedseek.db | platform DB (`postgresql+psycopg://...` in deployment) |
| FEDSEEK_MLFLOW_URI | sqlite:///$FEDSEEK_HOME/mlflow.db | MLflow tracking + registry (`http://host:5000` in deployment) |
| FEDSEEK_MLFLOW_ARTIFACTS | $FEDSEEK_HOME/mlartifacts | artifact root of the local store and of `fedseek dashboard` |
| FEDSEEK_DEFAULT_EPSILON_MAX | 10.0 | budget given to an institution a job meets for the first time |
| FEDSEEK_AUTO_PROMOTE | true | gate `champion` at the end of every job |
| FEDSEEK_MAX_FORGETTING | 0.05 | promotion limit on continual-learning Forgetting |
| FEDSEEK_MIN_BWT | -0.05 | promotion limit on continual-learning BWT |
"""
from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class PlatformSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FEDSEEK_")

    home: Path = Path("~/.fedseek")
    db_url: str | None = None
    mlflow_uri: str | None = None
    mlflow_artifacts: Path | None = None
    default_epsilon_max: float = 10.0
    auto_promote: bool = True
    max_forgetting: float = 0.05
    min_bwt: float = -0.05
    # tracked simulations may use seeded DP noise (privacy.reproducible_noise) only on a platform
    # set up for tests/benchmarks; the ledger then lists those jobs as NOT PRIVATE
    allow_reproducible_noise: bool = False

    @property
    def home_dir(self) -> Path:
        home = self.home.expanduser()
        home.mkdir(parents=True, exist_ok=True)
        return home

    @property
    def database_url(self) -> str:
        return _expand_sqlite(self.db_url) if self.db_url else f"sqlite:///{self.home_dir / 'fedseek.db'}"

    @property
    def tracking_uri(self) -> str:
        return _expand_sqlite(self.mlflow_uri) if self.mlflow_uri else f"sqlite:///{self.home_dir / 'mlflow.db'}"

    @property
    def artifact_root(self) -> Path:
        return (self.mlflow_artifacts or self.home_dir / "mlartifacts").expanduser()

    @property
    def outbox_dir(self) -> Path:
        return self.home_dir / "outbox"

    @property
    def checkpoint_dir(self) -> Path:
        return self.home_dir / "checkpoints"


def _expand_sqlite(url: str) -> str:
    """`sqlite:///~/x.db` -> `sqlite:////home/me/x.db`; other URLs unchanged."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and url[len(prefix):].startswith("~"):
        path = Path(url[len(prefix):]).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path)
    return url


def load_settings() -> PlatformSettings:
    return PlatformSettings()
