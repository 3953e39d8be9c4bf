"""The run configuration: a YAML file validated by pydantic before any heavy work.

Every model forbids unknown keys; every error message names the field and the bad value.
Relative paths (store, dataset path, checkpoint files) are resolved against the working
directory, like any command-line tool.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.cka import parse_size
from tasks.data import KINDS
from tasks.extract import SITE_PRESETS, ExtractOptions, ReductionError, check_reduction

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
STAGES = ("sample", "extract", "similarity", "analyses", "report")


class ConfigError(ValueError):
    """A configuration problem; the message lists every bad field with its value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetConfig(_Strict):
    kind: str = Field(description=f"dataset kind: {', '.join(KINDS)}")
    path: str | None = Field(None, description="dataset location; for digits: where the PNGs are exported")
    split: str | None = None
    options: dict[str, Any] = Field(default_factory=dict, description="kind-specific options")

    @field_validator("kind")
    @classmethod
    def _kind(cls, value: str) -> str:
        if value not in KINDS:
            raise ValueError(f"unknown dataset kind {value!r}; kinds: {', '.join(KINDS)}")
        return value

    @model_validator(mode="after")
    def _path_required(self) -> DatasetConfig:
        if self.kind not in ("digits", "synthetic") and not self.path:
            raise ValueError(f"dataset kind {self.kind!r} needs a 'path'")
        if self.path and self.kind not in ("digits", "synthetic") and not Path(self.path).exists():
            raise ValueError(f"dataset path does not exist: {self.path!r}")
        return self


class SamplingConfig(_Strict):
    n: Annotated[int, Field(gt=0)] | None = Field(None, description="number of images (None: all)")
    per_class: Annotated[int, Field(gt=0)] | None = Field(None, description="class-balanced: images per class")
    seed: int = 0
    views: Annotated[int, Field(ge=1)] = Field(1, description="augmented views per image (view 0 is the plain image)")
    on_bad_image: Literal["fail", "skip"] = "fail"

    @model_validator(mode="after")
    def _one_size(self) -> SamplingConfig:
        if self.n is not None and self.per_class is not None:
            raise ValueError(f"give either n ({self.n}) or per_class ({self.per_class}), not both")
        return self


def _check_sites(value: str | list[str]) -> str | list[str]:
    if isinstance(value, str) and value not in SITE_PRESETS:
        raise ValueError(f"unknown site preset {value!r}; presets: {', '.join(SITE_PRESETS)}, or a list of glob patterns")
    if isinstance(value, list) and not value:
        raise ValueError("site pattern list is empty")
    return value


def _check_reduction(value: str) -> str:
    try:
        return check_reduction(value)
    except ReductionError as error:
        raise ValueError(str(error)) from None


SitesSpec = Annotated[str | list[str], AfterValidator(_check_sites)]
Reduction = Annotated[str, AfterValidator(_check_reduction)]


class ModelConfig(_Strict):
    name: str
    arch: str = Field(description="timm architecture name, with a pretrained tag when weights is 'timm'")
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: str = Field(description="'random:<seed>', 'timm', or a local checkpoint path")
    sites: SitesSpec | None = None
    reduction: Reduction | None = None
    finetuned_from: str | None = None
    preprocessing: dict[str, Any] = Field(default_factory=dict, description="overrides of timm's data config")
    baseline_of: str | None = Field(None, description="set by `baselines: random`: the architecture this model is "
                                                      "the random-weights twin of")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_PATTERN.match(value):
            raise ValueError(f"model name {value!r} may only use letters, digits, '_' and '-'")
        return value

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: str) -> str:
        if value == "timm":
            return value
        if value.startswith("random:"):
            if not value.removeprefix("random:").lstrip("-").isdigit():
                raise ValueError(f"random weights need an integer seed, e.g. 'random:0' (got {value!r})")
            return value
        if not value.endswith((".safetensors", ".pth", ".pth.tar", ".pt", ".bin")):
            raise ValueError(f"weights must be 'random:<seed>', 'timm' or a .safetensors/.pth/.pth.tar file (got {value!r})")
        if not Path(value).is_file():
            raise ValueError(f"checkpoint file not found: {value!r}")
        return value


class SimilarityConfig(_Strict):
    kernel: Literal["linear", "rbf"] = "linear"
    estimator: Literal["biased", "unbiased"] = "biased"
    method: Literal["auto", "blocked", "features", "minibatch"] = "auto"
    rbf_threshold: Annotated[float, Field(gt=0)] = 0.5
    batch_size: Annotated[int, Field(ge=4)] = 256
    seed: int = Field(0, description="seed of the minibatch draws (method: minibatch)")
    name: str | None = None

    @property
    def key(self) -> str:
        """Name of the result under similarity/ in the store."""
        if self.name:
            return self.name
        suffix = "_minibatch" if self.method == "minibatch" else ""
        return f"{self.kernel}_{self.estimator}{suffix}"

    def engine_options(self) -> dict[str, Any]:
        """The matrix settings as `tasks.cka.update_similarity` takes them."""
        return self.model_dump(exclude={"name"})

    @model_validator(mode="after")
    def _consistent(self) -> SimilarityConfig:
        if self.kernel == "rbf" and self.method == "features":
            raise ValueError("method 'features' only exists for the linear kernel")
        if self.method == "minibatch" and self.estimator != "unbiased":
            raise ValueError("minibatch CKA averages unbiased HSIC: set estimator: unbiased")
        if self.name is not None and not NAME_PATTERN.match(self.name):
            raise ValueError(f"similarity name {self.name!r} may only use letters, digits, '_' and '-'")
        return self


class AnalysesConfig(_Strict):
    probes: bool = True
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.3
    probe_seed: int = 0
    bootstrap: Annotated[int, Field(ge=0)] = 0


class ComputeConfig(_Strict):
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu, cuda or cuda:<k>")
    batch_size: Annotated[int, Field(gt=0)] = 64
    dtype: Literal["float32", "float16"] = Field("float32", description="storage dtype of activations")
    autocast: Literal["auto", "off", "bf16", "fp16"] = "auto"
    shard_size: Annotated[int, Field(gt=0)] = 512
    loader_workers: Annotated[int, Field(ge=0)] = 0
    dask_address: str | None = None
    extract_devices: list[Annotated[str, Field(pattern=r"^(cpu|cuda(:\d+)?)$")]] = Field(
        default_factory=list, description="split each model's extraction by shard range over these devices, "
                                          "in parallel (e.g. [cuda:0, cuda:1]); empty: one task on `device`")
    n_workers: Annotated[int, Field(gt=0)] = 2
    memory_budget: str = "2GiB"
    precision: Literal["float32", "float64"] = "float32"

    def extract_options(self) -> ExtractOptions:
        """The compute settings of extraction."""
        return ExtractOptions(batch_size=self.batch_size, device=self.device, dtype=self.dtype, shard_size=self.shard_size,
                              autocast=self.autocast, loader_workers=self.loader_workers)

    def engine_options(self) -> dict[str, Any]:
        """The compute settings the CKA engine takes."""
        return {"precision": self.precision, "memory_budget": self.memory_budget, "device": self.device}

    @field_validator("memory_budget")
    @classmethod
    def _budget(cls, value: str) -> str:
        if parse_size(value) < 2**20:
            raise ValueError(f"memory_budget {value!r} is below 1MiB")
        return value


class RunConfig(_Strict):
    name: str = "ckaflow"
    store: str = Field(description="run store: local directory or fsspec URL")
    dataset: DatasetConfig
    sampling: SamplingConfig = SamplingConfig()
    models: list[ModelConfig] = Field(min_length=1)
    sites: SitesSpec = "vit-blocks"
    reduction: Reduction = "mean"
    similarity: list[SimilarityConfig] = Field(default_factory=lambda: [SimilarityConfig()], min_length=1)
    analyses: AnalysesConfig = AnalysesConfig()
    compute: ComputeConfig = ComputeConfig()
    baselines: Literal["random"] | None = Field(
        None, description="'random': add a random-weights twin of each architecture (model `<arch>_random`), so the "
                          "report shows how much of a similarity the architecture alone gives")

    @model_validator(mode="after")
    def _random_baselines(self) -> RunConfig:
        """With `baselines: random`, one random-weights twin per architecture (same arch, arch_kwargs, sites,
        reduction, preprocessing), after the configured models; a twin already present is kept as is."""
        if self.baselines != "random":
            return self
        twins = {m.baseline_of for m in self.models if m.baseline_of}
        names = {m.name for m in self.models}
        for model in [m for m in self.models if not m.baseline_of]:
            key = model.arch
            if key in twins:
                continue
            twins.add(key)
            used = {m.weights for m in self.models if m.arch == key}
            seed = next(k for k in range(len(used) + 1) if f"random:{k}" not in used)
            name = re.sub(r"[^A-Za-z0-9_-]", "_", key) + "_random"
            while name in names:
                name += "_"
            names.add(name)
            self.models.append(model.model_copy(update={"name": name, "weights": f"random:{seed}", "finetuned_from": None,
                                                        "baseline_of": key}))
        return self

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; repeated: {duplicates}")
        for model in self.models:
            if model.finetuned_from is not None and model.finetuned_from not in names:
                raise ValueError(f"model {model.name!r}: finetuned_from {model.finetuned_from!r} is not a model of this config")
        keys = [s.key for s in self.similarity]
        if len(set(keys)) != len(keys):
            raise ValueError(f"similarity entries must have distinct names; got {keys}")
        return self

    def model(self, name: str) -> ModelConfig:
        return next(m for m in self.models if m.name == name)

    def sites_of(self, model: ModelConfig) -> SitesSpec:
        return model.sites if model.sites is not None else self.sites

    def reduction_of(self, model: ModelConfig) -> str:
        return model.reduction if model.reduction is not None else self.reduction


def _format_errors(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration{' ' + source if source else ''}:"]
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {field}: {message}{shown}")
    return "\n".join(lines)


def validate_config(data: dict[str, Any], source: str = "") -> RunConfig:
    """Validate a configuration mapping; raise ConfigError naming every bad field."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid configuration{' ' + source if source else ''}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, source)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read and validate a YAML config file; `overrides` replace top-level keys (e.g. store)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {str(path)!r}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"invalid configuration {str(path)!r}: the top level must be a mapping, got {type(data).__name__}")
    return validate_config(dict(data or {}, **(overrides or {})), source=repr(str(path)))
