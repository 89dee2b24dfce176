"""Run configuration of a FedMosaic federation, validated once when a run starts.

The single source of defaults is ``[tool.flwr.app.config]`` in ``pyproject.toml`` (kebab-case keys);
``--run-config`` overrides them. :func:`parse_run_config` turns that flat mapping into a validated
:class:`FederationConfig` or raises :class:`ConfigError` with one line naming the bad key.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from fedmosaic_core.methods import METHODS
from fedmosaic_core.storage import cache_home

#: the strategies (:data:`fedmosaic_core.methods.METHODS` owns what each does)
STRATEGIES: tuple[str, ...] = tuple(METHODS)
#: ablations for ``fedmosaic compare``: a method name → the run-config it runs with
ABLATIONS: dict[str, dict[str, Any]] = {
    "fedmosaic-pq-only": {"strategy": "fedmosaic", "share-same-arch": False},  # no plain-LoRA sharing
    "fedmosaic-beta-half": {"strategy": "fedmosaic", "fixed-beta": 0.5},  # gate fixed at β = ½
    # the trained-global variant with P/Q shared only within a model family
    "fedmosaic-trained-global-within-family": {"strategy": "fedmosaic-trained-global", "share-across-families": False},
    # the trained-global variant whose RELA mix keeps the client's own trained global branch
    "fedmosaic-trained-global-with-self": {"strategy": "fedmosaic-trained-global", "include-self": True},
    "fedmosaic-trained-global-within-family-with-self": {
        "strategy": "fedmosaic-trained-global", "share-across-families": False, "include-self": True},
    # a client with no same-architecture (or, within families, no family) peer keeps a zero global
    "fedmosaic-peerless-keep": {"strategy": "fedmosaic", "peerless-global": "keep"},
}


class ConfigError(ValueError):
    """A run-config value is wrong; the message names the key."""


class FederationConfig(BaseModel):
    """All knobs of a run. Field names are snake_case; run-config keys are their kebab-case form."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    # --- federation ---
    num_server_rounds: int = Field(8, ge=1)
    strategy: str = "fedmosaic"  # one of STRATEGIES
    seed: int = Field(0, ge=0)
    run_name: str = ""
    output_dir: str = ""
    resume: bool = False
    # A lost SuperNode ends its part of a round by itself: the SuperLink answers NODE_UNAVAILABLE
    # once the node's lease runs out (≤ 60 s after a crash, at once after SIGTERM). The timeout only
    # bounds live but slow clients: 900 s leaves room for a 4-bit 1-3B client's round on an edge GPU.
    round_timeout: float = Field(900.0, gt=0)
    # rounds wait (up to round-timeout) for this many SuperNodes; 2 is the least that can share
    min_clients: int = Field(2, ge=1)
    fraction_train: float = Field(1.0, gt=0, le=1)
    max_reply_mb: float = Field(64.0, gt=0)
    # --- benchmark / data ---
    scenario: str = "two-families"
    data_root: str = ""
    stream_mode: Literal["dynamic", "static"] = "dynamic"
    rounds_per_task: int = Field(4, ge=1)
    eval_others_every: int = Field(0, ge=0)
    eval_unseen: bool = True
    eval_max_samples: int = Field(0, ge=0)  # Self: the first N test questions per task; 0: all
    eval_others_max_samples: int = Field(30, ge=0)  # Others and unseen, per task; 0: all
    scoring: Literal["likelihood", "generation"] = "likelihood"
    max_new_tokens: int = Field(6, ge=1)
    max_length: int = Field(128, ge=16)
    # --- local training ---
    local_steps: int = Field(32, ge=1)
    # true: each strategy runs its share of local-steps (the reference's equal-compute budgets:
    # ditto 0.5 (two steps per batch), fedsim 0.75, fedmosaic 0.94, others 1); false: all run local-steps
    equal_compute: bool = True
    batch_size: int = Field(8, ge=1)
    lr_pq: float = Field(1e-2, gt=0)
    lr_lora: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    # a module's gate trains only once its global branch is non-zero (false: always, as the reference)
    gate_rest_without_global: bool = True
    # ablations: -1 = the learned gate, a value in [0, 1] fixes every gate's β to it
    fixed_beta: float = Field(-1.0, ge=-1.0, le=1.0)
    # false: only the shared P/Q reach the globals; plain-LoRA modules keep a zero global branch
    share_same_arch: bool = True
    # false (beyond the paper): the shared P/Q mix only among clients of one model family
    share_across_families: bool = True
    # true (beyond the paper): a client's own uploaded state is in its RELA mix (W_ii > 0)
    include_self: bool = False
    # a client with no peer in a part's mix (no same-architecture peer; no family peer with
    # share-across-families false): "self-copy" (the reference) gets its own state of this round as
    # that part's global; "keep" (beyond the paper) keeps its previous global, zero until it had a peer
    peerless_global: Literal["self-copy", "keep"] = "self-copy"
    # --- PQ-LoRA ---
    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    quantization: Literal["none", "nf4", "int8"] = "none"
    # true: recompute each decoder layer's activations in backward (less memory, one more forward)
    gradient_checkpointing: bool = False
    pretrained: bool = True  # false: untrained tiny presets (smoke tests only)
    # --- RELA ---
    tau: float = Field(0.5, gt=0)
    norm_bound: float = Field(0.0, ge=0)  # > 0: bound each client's contribution to c × the median norm
    probe_model: str = ""
    probe_every: int = Field(4, ge=1)
    rows_fraction: float = Field(0.4, gt=0, le=1)
    noise_std: float = Field(1e-4, ge=0)
    tv_compression: float = Field(8.0, ge=1)
    tv_sketch_dim: int = Field(8, ge=2)
    align_bases: bool = True
    # --- resources ---
    # Tiny models run fastest single-threaded (measured: 20x faster than 2 threads on a busy
    # 2-core host); 0 = all cores. In simulation each client gets this many CPUs from Ray.
    torch_threads: int = Field(1, ge=0)

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"must be one of {', '.join(METHODS)}, got {value!r}")
        return value

    @field_validator("fixed_beta")
    @classmethod
    def _beta(cls, value: float) -> float:
        if value != -1.0 and not 0.0 <= value <= 1.0:
            raise ValueError(f"must be -1 (the learned gate) or a value in [0, 1], got {value!r}")
        return value

    @field_validator("include_self", "peerless_global")
    @classmethod
    def _rela_only(cls, value: Any, info: ValidationInfo) -> Any:
        """A value off its default (include-self true, peerless-global keep) needs RELA aggregation."""
        strategy = info.data.get("strategy")
        if info.field_name and value != cls.model_fields[info.field_name].default and strategy in METHODS and METHODS[strategy].aggregation not in ("fedmosaic", "fedmosaic-uniform"):
            raise ValueError(f"{value!r} applies only to the RELA strategies (fedmosaic*); strategy {strategy!r} "
                             f"aggregates with {METHODS[strategy].aggregation!r}")
        return value

    @field_validator("output_dir", "data_root")
    @classmethod
    def _absolute(cls, value: str) -> str:
        # ServerApp/ClientApp run from a copy under $FLWR_HOME: relative paths would point there.
        if value and not Path(value).expanduser().is_absolute():
            raise ValueError(f"must be an absolute path (the app runs from a copy), got {value!r}")
        return value

    # --- derived ---
    @property
    def local_iterations(self) -> int:
        """Batches per client round under this strategy's compute share (see ``equal-compute``)."""
        return METHODS[self.strategy].local_iterations(self.local_steps, self.equal_compute)

    @property
    def upload_shared(self) -> bool:
        """Whether the server aggregates the clients' shared P/Q states (so they upload them)."""
        return METHODS[self.strategy].aggregation != "local"

    @property
    def upload_same_arch(self) -> bool:
        """Whether the server aggregates the clients' same-architecture LoRA states."""
        return self.upload_shared and self.share_same_arch

    @property
    def resolved_run_name(self) -> str:
        return self.run_name or f"{self.scenario.rsplit('/', 1)[-1].removesuffix('.json')}-{self.strategy}-seed{self.seed}"

    @property
    def run_dir(self) -> Path:
        base = Path(self.output_dir).expanduser() if self.output_dir else cache_home() / "runs"
        return base / self.resolved_run_name

    def to_flat(self) -> dict[str, Any]:
        """The kebab-case mapping (what ``--run-config`` and a Flower ConfigRecord carry)."""
        return {k.replace("_", "-"): v for k, v in self.model_dump().items()}


def parse_run_config(raw: Mapping[str, Any]) -> FederationConfig:
    """Validate a flat kebab-case run config; unknown keys and bad values raise ConfigError."""
    data: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in FederationConfig.model_fields:
            known = ", ".join(sorted(k.replace("_", "-") for k in FederationConfig.model_fields))
            raise ConfigError(f"run config: unknown key {key!r} (known keys: {known})")
        data[name] = value
    try:
        return FederationConfig(**data)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"]).replace("_", "-") or "<config>"
        raise ConfigError(
            f"run config: bad value for {key!r}: {first['msg']} (got {first.get('input')!r})"
        ) from None
