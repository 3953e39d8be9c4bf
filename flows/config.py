"""The run configuration: a YAML file validated by pydantic before any heavy work.

Every model forbids unknown keys; every error message names the field and the bad value.
Relative paths (store, dataset path, checkpoint files) are resolved against the working
directory, like any command-line tool; the modules of import-path factories (`arch: module:factory`)
are also looked for next to the config file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.analyses.options import ANALYSES, AnalysesOptions  # light modules only: a schema error costs no torch, timm, xarray or dask
from tasks.cka.options import CkaOptions
from storage.sizes import parse_size
from tasks.data.datasets import KINDS
from tasks.extract.options import (
    MEMORY_PREFIX,
    SITE_PRESETS,
    ExtractOptions,
    ReductionError,
    check_preprocessing,
    check_reduction,
    importable,
    is_import_path,
)
from tasks.suggest import did_you_mean

if TYPE_CHECKING:
    from tasks.data import ImageDataset

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
STAGES = ("sample", "extract", "similarity", "analyses", "report")
GLOB_OR_TAP = re.compile(r"[*?\[:/]")  # a `sites` string with one of these is a pattern or a site name, not a preset


class ConfigError(ValueError):
    """A configuration problem; the message lists every bad field with its value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetConfig(_Strict):
    kind: str = Field(description=f"dataset kind: {', '.join(KINDS)}")
    path: str | None = Field(None, description="dataset location; for digits: where the PNGs are exported")
    split: str | None = Field(None, description="split, for kinds that have them (hf, cifar10)")
    options: dict[str, Any] = Field(default_factory=dict, description="kind-specific options")

    def open(self) -> ImageDataset:
        """The dataset this entry describes (`tasks.data.open_dataset`)."""
        from tasks.data import open_dataset

        return open_dataset(self.kind, self.path, self.split, **self.options)

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
    seed: int = Field(0, description="same seed + same dataset = same sample on any machine")
    views: Annotated[int, Field(ge=1)] = Field(1, description="augmented views per image (view 0 is the plain image)")
    on_bad_image: Literal["fail", "skip"] = Field("fail", description="fail (naming the file), or skip it "
                                                                       "(recorded in the store and the report)")

    @model_validator(mode="after")
    def _one_size(self) -> SamplingConfig:
        if self.n is not None and self.per_class is not None:
            raise ValueError(f"give either n ({self.n}) or per_class ({self.per_class}), not both")
        return self


def _check_sites(value: str | list[str]) -> str | list[str]:
    if isinstance(value, str) and value not in SITE_PRESETS and not GLOB_OR_TAP.search(value):
        raise ValueError(f"unknown site preset {value!r}{did_you_mean(value, SITE_PRESETS)} (presets: "
                         f"{', '.join(SITE_PRESETS)}; or a pattern such as '{value}.*' or '{value}:output')")
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
    name: str = Field(description="model name in the store and the report (letters, digits, '_', '-')")
    arch: str = Field(description="timm architecture name (with a pretrained tag when weights is 'timm'), or an "
                                  "import path 'package.module:factory' of any callable returning an nn.Module")
    arch_kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the timm model or factory")
    weights: str = Field(description="'random:<seed>', 'timm', or a local checkpoint path")
    sites: SitesSpec | None = Field(None, description="this model's sites (default: the top-level `sites`)")
    reduction: Reduction | None = Field(None, description="this model's reduction (default: the top-level `reduction`)")
    finetuned_from: str | None = Field(None, description="name of the model of this config it was fine-tuned from")
    preprocessing: dict[str, Any] = Field(default_factory=dict, description="overrides of the model's data config "
                                          "(timm's; a model without one takes the images as they are: no resize or "
                                          "crop, values in [0, 1]): input_size, img_size, mean, std, crop_pct, "
                                          "crop_mode, interpolation")
    baseline_of: str | None = Field(None, description="set by `baselines: random`: the architecture this model is "
                                                      "the random-weights twin of")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_PATTERN.match(value):
            raise ValueError(f"model name {value!r} may only use letters, digits, '_' and '-'")
        return value

    @field_validator("preprocessing")
    @classmethod
    def _preprocessing(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_preprocessing(value)

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: str) -> str:
        if value in ("timm", "module"):  # 'module': an in-memory module's own weights (ckaflow.compare)
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

    @model_validator(mode="after")
    def _weights_of_arch(self) -> ModelConfig:
        in_memory = self.arch.startswith(MEMORY_PREFIX)
        if in_memory != (self.weights == "module"):
            raise ValueError(f"model {self.name!r}: weights 'module' go with in-memory modules (arch 'memory:...') "
                             f"and only with them (arch {self.arch!r}, weights {self.weights!r})")
        if self.weights == "timm" and is_import_path(self.arch):
            raise ValueError(f"model {self.name!r}: weights 'timm' need a timm architecture name, not {self.arch!r}")
        return self


class SimilarityConfig(_Strict):
    kernel: Literal["linear", "rbf"] = Field("linear", description="kernel of the CKA")
    estimator: Literal["biased", "unbiased"] = Field("biased", description="HSIC estimator (unbiased: Song et al. 2012)")
    method: Literal["auto", "blocked", "features", "minibatch"] = Field(
        "auto", description="exact in sample space (blocked), exact in feature space (linear only), minibatch, "
                            "or the cheaper exact one (auto)")
    rbf_threshold: Annotated[float, Field(gt=0)] = Field(0.5, description="RBF bandwidth as a fraction of the "
                                                                           "median distance")
    rbf_median_samples: int = Field(4096, ge=2, description="RBF median: exact up to this N, else a seeded subsample")
    batch_size: Annotated[int, Field(ge=4)] = Field(256, description="minibatch size (method: minibatch)")
    seed: int = Field(0, description="seed of the minibatch draws (method: minibatch)")
    views: Literal["clean", "all"] = Field("clean", description="rows of the matrix: clean (view 0, the plain "
                                                               "images) or all (augmented views too)")
    name: str | None = Field(None, description="name under similarity/ (default: <kernel>_<estimator>"
                                               "[_minibatch])")

    @property
    def key(self) -> str:
        """Name of the result under similarity/ in the store."""
        if self.name:
            return self.name
        suffix = "_minibatch" if self.method == "minibatch" else ""
        return f"{self.kernel}_{self.estimator}{suffix}"

    def options(self, compute: ComputeConfig) -> CkaOptions:
        """The matrix's options as `tasks.cka.update_similarity` takes them, with the compute settings."""
        return CkaOptions(**self.model_dump(exclude={"name"}), precision=compute.precision,
                          memory_budget=compute.budget_bytes, device=compute.device)

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
    probes: bool = Field(True, description="linear probe per site on a seeded train/test split")
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = Field(0.3, description="share of images held out by the probes")
    probe_seed: int = Field(0, description="seed of the probes' split and of the jackknife groups")
    bootstrap: Annotated[int, Field(ge=0)] = Field(0, description="groups of images of the delete-group jackknife "
                                                                  "band of matched CKA (0: no band; at least 2)")
    views: Literal["clean", "all"] = Field("clean", description="rows of the probes, agreement and label "
                                                               "alignment: clean (view 0) or all; the identity "
                                                               "target always uses every view")
    probe_solver: Literal["auto", "lbfgs", "ridge"] = Field("auto", description="auto: batched L-BFGS logistic "
                                                            "probes (out-of-core SGD beyond the memory budget); "
                                                            "ridge: exact closed-form probe, streamed")
    skip: list[str] = Field(default_factory=list, description=f"analyses not computed: any of {', '.join(ANALYSES)} "
                                                              "(without probes, no agreement)")

    def options(self, compute: ComputeConfig) -> AnalysesOptions:
        """The stage's options as `tasks.analyses.run_analyses` takes them, with the compute settings."""
        return AnalysesOptions(**self.model_dump(exclude={"skip"}), skip=tuple(self.skip),
                               memory_budget=compute.budget_bytes, device=compute.device)

    @field_validator("skip")
    @classmethod
    def _known_analyses(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in ANALYSES]
        if unknown:
            raise ValueError(f"unknown analysis {unknown[0]!r}{did_you_mean(unknown[0], ANALYSES)} "
                             f"(analyses: {', '.join(ANALYSES)})")
        return value

    @field_validator("bootstrap")
    @classmethod
    def _groups(cls, value: int) -> int:
        if value == 1:
            raise ValueError("the jackknife band needs at least 2 groups (0: no band)")
        return value


class ComputeConfig(_Strict):
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu, cuda or cuda:<k>")
    batch_size: Annotated[int, Field(gt=0)] = Field(64, description="images per forward pass")
    dtype: Literal["float32", "float16"] = Field("float32", description="storage dtype of activations")
    autocast: Literal["auto", "off", "bf16", "fp16"] = Field("auto", description="mixed precision on CUDA "
                                                                          "(auto: bf16 where supported)")
    shard_size: Annotated[int, Field(gt=0)] = Field(512, description="samples per shard: the unit of resume "
                                                                      "and of parallel writes")
    loader_workers: Annotated[int, Field(ge=0)] = Field(0, description="DataLoader worker processes decoding images")
    dask_address: str | None = Field(None, description="scheduler of an external Dask cluster "
                                                       "(tcp://host:8786); none: one LocalCluster per run")
    extract_devices: list[Annotated[str, Field(pattern=r"^(cpu|cuda(:\d+)?)$")]] = Field(
        default_factory=list, description="split each model's extraction by shard range over these devices, "
                                          "in parallel (e.g. [cuda:0, cuda:1]); empty: one task on `device`")
    n_workers: Annotated[int, Field(gt=0)] = Field(2, description="LocalCluster worker processes")
    threads: Annotated[int, Field(gt=0)] | None = Field(
        None, description="thread budget of the whole pipeline (flow process, LocalCluster workers x threads, "
                          "BLAS/torch pools); default: the cores available (CPU affinity, cgroup quota)")
    memory_budget: str = Field("2GiB", description="bounds the CKA engine's and the probes' working memory, "
                                                   "whatever the number of images (not the workers' memory limit)")
    precision: Literal["float32", "float64"] = Field("float32", description="Gram precision (sums are "
                                                                            "always float64)")

    def extract_options(self) -> ExtractOptions:
        """The compute settings of extraction."""
        return ExtractOptions(batch_size=self.batch_size, device=self.device, dtype=self.dtype, shard_size=self.shard_size,
                              autocast=self.autocast, loader_workers=self.loader_workers)

    @property
    def budget_bytes(self) -> int:
        """`memory_budget` in bytes."""
        return parse_size(self.memory_budget)

    @field_validator("memory_budget")
    @classmethod
    def _budget(cls, value: str) -> str:
        if parse_size(value) < 2**20:
            raise ValueError(f"memory_budget {value!r} is below 1MiB")
        return value


class ReportConfig(_Strict):
    color_range: Literal["data", "unit"] = Field(
        "data", description="heatmap colours, one scale per CKA matrix shared by all its heatmaps: data (the "
                            "matrix's finite range, rounded out to 0.01) or unit (0-1, extended below 0 when the data are)")


class RunConfig(_Strict):
    name: str = Field("ckaflow", description="name of the run (report title)")
    store: str = Field(description="run store: local directory or fsspec URL")
    dataset: DatasetConfig
    sampling: SamplingConfig = SamplingConfig()
    models: list[ModelConfig] = Field(min_length=1)
    sites: SitesSpec = Field("vit-blocks", description=f"sites of every model: a preset ({', '.join(SITE_PRESETS)}), "
                                                       "a glob pattern ('blocks.*.mlp:output'), a site name as "
                                                       "`ckaflow sites` prints it ('blocks.3/attn'), or a list of them")
    reduction: Reduction = Field("mean", description="tensor -> feature vector: cls, mean, tokens, avgpool, "
                                                     "pool<k> or flatten")
    similarity: list[SimilarityConfig] = Field(default_factory=lambda: [SimilarityConfig()], min_length=1)
    analyses: AnalysesConfig = AnalysesConfig()
    compute: ComputeConfig = ComputeConfig()
    baselines: Literal["random"] | None = Field(
        None, description="'random': add a random-weights twin of each architecture (model `<arch>_random`), so the "
                          "report shows how much of a similarity the architecture alone gives")
    report: ReportConfig = ReportConfig()

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
            if key in twins or key.startswith(MEMORY_PREFIX):  # an in-memory module has no random-weights twin
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


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The config section a field holds (itself or as list items), if it is one."""
    inner = get_args(annotation)[0] if get_origin(annotation) is list else annotation
    return inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None


def _section(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The config section holding the key at `loc` (RunConfig at the top level)."""
    section: type[BaseModel] | None = RunConfig
    for part in loc[:-1]:
        if isinstance(part, str):
            field = section.model_fields.get(part) if section else None
            section = _model_of(field.annotation) if field else None
    return section


def _format_errors(error: ValidationError, source: str) -> str:
    """One line per bad field: where, the field, what is wrong and the bad value (unless the message shows it)."""
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        value, hint = item.get("input"), ""
        if item["type"] == "extra_forbidden":
            section = _section(item["loc"])
            message, hint = "unknown key", did_you_mean(str(item["loc"][-1]), section.model_fields) if section else ""
        shown = "" if isinstance(value, dict) or repr(value) in message else f" (got {value!r})"
        lines.append(f"invalid configuration{' ' + source if source else ''}: {field}: {message}{shown}{hint}")
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
    config = validate_config(dict(data or {}, **(overrides or {})), source=repr(str(path)))
    if any(is_import_path(model.arch) for model in config.models):
        importable(path.parent)
    return config


def _type_name(annotation: Any) -> str:
    """A short, readable type: Literal choices, optional and list types, without pydantic's constraints."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (UnionType, Union):
        return " | ".join(_type_name(a) for a in args if a is not type(None)) + (" | null" if type(None) in args else "")
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _rows(model: type[BaseModel], prefix: str) -> list[tuple[str, str, str, str]]:
    rows = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = info.annotation
        inner = _model_of(annotation)
        if inner is not None:
            rows += _rows(inner, f"{key}[]." if get_origin(annotation) is list else f"{key}.")
            continue
        constraints = ", ".join(f"{symbol} {getattr(m, attr)}" for m in info.metadata
                                for attr, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
                                if getattr(m, attr, None) is not None)
        default = "required" if info.is_required() else json.dumps(info.get_default(call_default_factory=True))
        text = (info.description or "") + (f" ({constraints})" if constraints else "")
        rows.append((key, _type_name(annotation), default, text))
    return rows


def config_reference() -> str:
    """The configuration reference as a Markdown table (key, type, default, meaning), built from the schema."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, kind, default, text in _rows(RunConfig, ""):
        cells = (f"`{key}`", kind, f"`{default}`" if default != "required" else "required", text)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
