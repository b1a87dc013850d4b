"""The architecture registry: config schemas, builders and the `@register_architecture` decorator.

Modelled on torchvision's `register_model()` / `get_model()` (torchvision/models/_api.py): builders
register under a unique name at import time, and the service builds modules by name from a
validated config, then loads a state_dict into them.
"""

from __future__ import annotations

import importlib
import math
import re
import threading
from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypedDict, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from torch import nn

Task = Literal["classification", "regression"]

# Classifier heads beyond this size are almost surely a typo, and `labels()` materialises them.
MAX_CLASSES = 100_000
# Values in one input sample (16 MiB as float32). The serving gate runs a probe batch of a few
# random samples through every new version, and training holds batches of them: a config with
# far larger samples (clip3d at 64x256x512x512 asked for 64 GiB) is refused when the model is
# created rather than when the gate tries to allocate it.
MAX_INPUT_ELEMENTS = 2**22

NumClasses = Annotated[
    int, Field(ge=2, le=MAX_CLASSES, description="Number of classes (width of the output layer).")
]
ClassLabel = Annotated[str, Field(min_length=1, max_length=200)]


def dropout_layer(p: float) -> nn.Module:
    """nn.Dropout(p), or nn.Identity at p == 0: a no-op Dropout still costs a kernel per call."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


# Dropout (Srivastava et al. 2014) is active in train mode only: a served model (eval mode) is
# deterministic whatever p is, and nn.Dropout has no parameters, so p never changes the
# state_dict's keys and checkpoints load whatever it is set to.
DropoutP = Annotated[
    float,
    Field(
        ge=0,
        lt=1,
        allow_inf_nan=False,
        description="Probability of zeroing each unit where the architecture places dropout "
        "(training only; 0 = off).",
    ),
]


class BatchNormOptions(TypedDict):
    """Keyword arguments shared by `nn.BatchNorm1d/2d/3d`, taken from a config."""

    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool


class ArchConfig(BaseModel):
    """Base of every architecture's config: the BatchNorm options all of them share."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bn_eps: float = Field(
        1e-5, gt=0, allow_inf_nan=False, description="Added to the variance before the sqrt."
    )
    bn_momentum: float | None = Field(
        0.1,
        gt=0,
        le=1,
        description="Weight of the batch statistic in the running-average update; "
        "null means a cumulative (equal-weight) average.",
    )
    bn_affine: bool = Field(True, description="Learn a per-channel scale (gamma) and shift (beta).")
    track_running_stats: bool = Field(
        True, description="Keep running mean/variance for eval mode; must stay true."
    )

    @field_validator("track_running_stats")
    @classmethod
    def _require_running_stats(cls, value: bool) -> bool:
        # Without running estimates BatchNorm normalises with the current batch's statistics even
        # in eval mode (PyTorch BatchNorm2d docs), so a prediction would depend on whichever
        # requests were batched with it, and a batch of one would be normalised to beta.
        if not value:
            raise ValueError(
                "track_running_stats=false is not supported: without running statistics BatchNorm "
                "uses batch statistics in eval mode too, so each prediction would depend on the "
                "other samples in its batch"
            )
        return value

    @model_validator(mode="after")
    def _check_input_size(self) -> ArchConfig:
        shape = self.input_shape()
        elements = math.prod(shape)
        if elements > MAX_INPUT_ELEMENTS:
            raise ValueError(
                f"one input sample would have {elements} values (shape {list(shape)}); the limit "
                f"is {MAX_INPUT_ELEMENTS} values per sample, so that probe and training batches "
                "fit in memory: choose smaller input dimensions"
            )
        return self

    if TYPE_CHECKING:
        # Declared for type checkers only: subclasses provide `task` as a property
        # (ClassifierConfig) or as a field (MLPConfig); a runtime property here would make
        # pydantic warn that such a field shadows it. `register_architecture` checks it is there.
        @property
        def task(self) -> Task: ...

    @abstractmethod
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, without the batch dimension."""

    @abstractmethod
    def num_outputs(self) -> int:
        """Width of the model's output per sample."""

    def labels(self) -> list[str] | None:
        """Class labels in output order for classifiers; None for regression."""
        return None

    def batch_norm_options(self) -> BatchNormOptions:
        """The BN keyword arguments every builder passes to its BatchNorm layers."""
        return BatchNormOptions(
            eps=self.bn_eps,
            momentum=self.bn_momentum,
            affine=self.bn_affine,
            track_running_stats=self.track_running_stats,
        )


class ClassifierConfig(ArchConfig):
    """Config of an architecture whose output is one logit per class."""

    num_classes: NumClasses
    class_labels: list[ClassLabel] | None = Field(
        None, description="Names of the classes in output order; defaults to '0', '1', ..."
    )

    @property
    def task(self) -> Task:
        return "classification"

    def num_outputs(self) -> int:
        return self.num_classes

    def labels(self) -> list[str]:
        if self.class_labels is not None:
            return list(self.class_labels)
        return [str(i) for i in range(self.num_classes)]

    @field_validator("num_classes")
    @classmethod
    def _check_num_classes(cls, value: int) -> int:
        # Repeats NumClasses' bounds for subclasses that redeclare `num_classes: int = 3`, which
        # drops the Field constraints but keeps inherited validators.
        if not 2 <= value <= MAX_CLASSES:
            raise ValueError(f"num_classes must be between 2 and {MAX_CLASSES}, got {value}")
        return value

    @field_validator("class_labels")
    @classmethod
    def _check_class_labels(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        return check_class_labels(value, info.data.get("num_classes"))


def check_class_labels(labels: list[str] | None, expected: int | None) -> list[str] | None:
    """Refuse labels that would not name each output exactly once."""
    if labels is None:
        return None
    # `expected` is None when that field failed validation itself: its own error says why.
    if expected is not None and len(labels) != expected:
        raise ValueError(f"expected {expected} class labels (one per output), got {len(labels)}")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"class labels must be unique; repeated: {', '.join(duplicates)}")
    return labels


class ConfigError(ValueError):
    """A config refused by its architecture; `errors` lists `{"field", "message"}` per problem."""

    def __init__(self, errors: list[dict[str, Any]], *, architecture: str | None = None) -> None:
        self.errors = errors
        self.architecture = architecture
        where = f" for architecture {architecture!r}" if architecture else ""
        problems = "; ".join(f"{e['field'] or '(config)'}: {e['message']}" for e in errors)
        super().__init__(f"invalid config{where}: {problems}")

    @classmethod
    def from_validation_error(
        cls, exc: ValidationError, *, architecture: str | None = None
    ) -> ConfigError:
        """Flatten pydantic's errors to dotted field paths and plain messages."""
        errors: list[dict[str, Any]] = []
        for err in exc.errors(include_url=False):
            message = err["msg"]
            # Our validators raise ValueError; pydantic prefixes "Value error, " to their text.
            if err["type"] == "value_error" and "error" in err.get("ctx", {}):
                message = str(err["ctx"]["error"])
            errors.append({"field": ".".join(str(p) for p in err["loc"]), "message": message})
        return cls(errors, architecture=architecture)


class UnknownArchitecture(KeyError):
    """No architecture is registered under this name."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = sorted(known)
        self.message = f"unknown architecture {name!r}; known: {', '.join(self.known) or 'none'}"
        super().__init__(self.message)

    def __str__(self) -> str:
        # KeyError's own __str__ would repr() the message, quotes and all.
        return self.message


@dataclass(frozen=True)
class Architecture:
    """A registered architecture: its config schema and the builder that makes the module."""

    name: str
    description: str
    config_cls: type[ArchConfig]
    builder: Callable[[Any], nn.Module]

    def parse_config(self, raw: Mapping[str, Any] | None) -> ArchConfig:
        """Validate a raw (JSON) config, filling defaults; raises ConfigError."""
        data: object = {} if raw is None else raw
        try:
            return self.config_cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError.from_validation_error(exc, architecture=self.name) from None

    def default_config(self) -> ArchConfig:
        """The config used when a client gives none."""
        return self.parse_config(None)

    def build(self, config: ArchConfig) -> nn.Module:
        """A freshly initialised module; the caller chooses train/eval mode and device."""
        if not isinstance(config, self.config_cls):
            raise TypeError(
                f"architecture {self.name!r} needs a {self.config_cls.__name__}, "
                f"got {type(config).__name__}"
            )
        return self.builder(config)

    def config_schema(self) -> dict[str, Any]:
        """JSON schema of the config, for clients and `GET /v1/architectures`."""
        return self.config_cls.model_json_schema()


F = TypeVar("F", bound=Callable[..., nn.Module])

# Names end up in URLs and checkpoint metadata, so keep them to a safe character set.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_registry: dict[str, Architecture] = {}
_lock = threading.Lock()


def register_architecture(
    name: str, *, description: str, config: type[ArchConfig]
) -> Callable[[F], F]:
    """Register a builder `fn(cfg) -> nn.Module` under `name`; a name can be taken only once."""
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"architecture name {name!r} must match {_NAME_RE.pattern}")
    if not (isinstance(config, type) and issubclass(config, ArchConfig)):
        raise TypeError(f"config for {name!r} must be an ArchConfig subclass, got {config!r}")
    has_task = "task" in config.model_fields or isinstance(getattr(config, "task", None), property)
    if not has_task:
        raise TypeError(f"{config.__name__} must define `task` (a property or a field)")

    def wrapper(fn: F) -> F:
        with _lock:
            # torchvision refuses duplicates too: a silent override would make a checkpoint load
            # into whichever module happened to register last.
            if name in _registry:
                previous = _registry[name].builder
                raise ValueError(
                    f"architecture {name!r} is already registered "
                    f"(by {previous.__module__}.{previous.__qualname__})"
                )
            _registry[name] = Architecture(name, description.strip(), config, fn)
        return fn

    return wrapper


def get_architecture(name: str) -> Architecture:
    """The architecture registered under `name`; raises UnknownArchitecture."""
    try:
        return _registry[name]
    except KeyError:
        raise UnknownArchitecture(name, _registry) from None


def list_architectures() -> list[Architecture]:
    """All registered architectures, sorted by name."""
    return [_registry[name] for name in sorted(_registry)]


def load_plugins(module_names: Iterable[str]) -> list[str]:
    """Import operator modules so their `@register_architecture` calls run; returns their names.

    A module already imported is not run again (Python's import cache), so loading twice is fine.
    A module that fails to import has any architectures it registered removed again, so a
    corrected retry does not trip over its own earlier half-registration.
    """
    loaded: list[str] = []
    # Plugin files may have been deployed after the interpreter cached directory listings.
    importlib.invalidate_caches()
    for raw_name in module_names:
        module_name = raw_name.strip()
        if not module_name:
            continue
        before = set(_registry)
        try:
            importlib.import_module(module_name)
        except Exception as exc:
            with _lock:
                for added in set(_registry) - before:
                    del _registry[added]
            raise ImportError(
                f"could not import architecture plugin module {module_name!r}: "
                f"{type(exc).__name__}: {exc}",
                name=module_name,
            ) from exc
        loaded.append(module_name)
    return loaded


def _unregister(name: str) -> None:
    """Remove an architecture; for tests that register throwaway ones."""
    with _lock:
        _registry.pop(name, None)
