"""bnserve's model architectures: a registry of BatchNorm networks built by name from a config.

Importing this package registers the built-in families (`seed_cnn`, `mnist_cnn`, `mlp_bn`,
`resnet18`, `clip3d`). Operators add their own architectures with a plugin module deployed next to
the service and named in its settings; `load_plugins` imports it at start-up, which runs its
`@register_architecture` decorators. A plugin module looks like this::

    # my_company/bnserve_plugins.py
    from __future__ import annotations

    from functools import partial

    from torch import nn

    from models import ClassifierConfig, NumClasses, register_architecture


    class TinyConfig(ClassifierConfig):
        num_classes: NumClasses = 3

        def input_shape(self) -> tuple[int, ...]:
            return (8,)


    @register_architecture(
        "tiny_mlp",
        description="An 8-feature, 3-class MLP with one BatchNorm1d layer.",
        config=TinyConfig,
    )
    def tiny_mlp(cfg: TinyConfig) -> nn.Module:
        bn = partial(nn.BatchNorm1d, **cfg.batch_norm_options())  # honours bn_eps, bn_momentum...
        return nn.Sequential(nn.Linear(8, 16), bn(16), nn.ReLU(), nn.Linear(16, cfg.num_classes))

Every BN layer should take `cfg.batch_norm_options()`, so the BN fields of the config (`bn_eps`,
`bn_momentum`, `bn_affine`) mean what they say. Names must be unique: registering a name twice
raises ValueError, and a module that fails to import raises ImportError naming it.
"""

from __future__ import annotations

# Imported for their side effect: each family module registers its architectures.
from models import clip3d, mlp, mnist_cnn, resnet, seed_cnn  # noqa: F401
from models.registry import (
    ArchConfig,
    Architecture,
    BatchNormOptions,
    ClassifierConfig,
    ConfigError,
    DropoutP,
    NumClasses,
    Task,
    UnknownArchitecture,
    dropout_layer,
    get_architecture,
    list_architectures,
    load_plugins,
    register_architecture,
)

__all__ = [
    "ArchConfig",
    "Architecture",
    "BatchNormOptions",
    "ClassifierConfig",
    "ConfigError",
    "DropoutP",
    "NumClasses",
    "Task",
    "UnknownArchitecture",
    "dropout_layer",
    "get_architecture",
    "list_architectures",
    "load_plugins",
    "register_architecture",
]
