"""Every attribution method behind one front door: the registry `METHODS` and `make_attributor`.

A method is an `Attributor` (`attributor.py`) built once per (run, settings); it then scores any
number of queries, each written as the same Parquet score table. Its settings are one or more
`Settings` sections (e.g. `unlearn`, `score` and `fisher` for unlearning); overrides are a flat
dict whose keys name a field of the method's main section (`alpha`), of the one other section
that has it (`timesteps`) or `section.field` (`fisher.draws`). Training-side features (gradients,
embeddings, baseline losses) are cached in the run's cache folder, keyed by what they depend on,
so a second query or a second process reuses them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd

from linernotes.attribution.attributor import Attributor
from linernotes.attribution.gradients import GradientSettings
from linernotes.attribution.losses import ScoreSettings
from linernotes.config import Settings, require
from linernotes.curvature import FisherSettings, covering_group
from linernotes.errors import LinernotesError
from linernotes.unlearning.newton import UnlearnSettings

KINDS = ("counterfactual", "gradient", "similarity", "peer")


@dataclasses.dataclass(frozen=True)
class DampingSettings(Settings):
    """λ = damping × mean diagonal (of ΦᵀΦ for TRAK, of the Fisher for fisher-influence)."""

    damping: float = 1e-3

    def validate(self) -> None:
        require(self.damping >= 0, "damping must be >= 0.")


@dataclasses.dataclass(frozen=True)
class RepresenterSettings(Settings):
    """The layer whose activations and output gradients are compared."""

    layer: str = ""  # "" = the last nn.Linear the model runs


@dataclasses.dataclass(frozen=True)
class ProjectionSettings(Settings):
    """The linear mode's stored training gradients: random projection and memory budget."""

    projection_dim: int = 2048  # 0 = exact gradients (no projection)
    projection: str = "sparse"  # "sparse" (fast for one query), "rademacher" or "gaussian"
    projection_seed: int = 0
    backend: str = "auto"  # per-sample gradients: "loop", "vmap" or "auto"
    batch_size: int = 8
    memory_mb: int = 1024

    def validate(self) -> None:
        require(self.projection_dim >= 0, "projection_dim must be >= 0 (0 = no projection).")
        require(self.batch_size >= 1 and self.memory_mb >= 1, "batch_size, memory_mb >= 1.")


@dataclasses.dataclass(frozen=True)
class PeerSettings(Settings):
    """The peer library's damping / regularisation."""

    damping: float = 0.0  # 0 = the library's own default

    def validate(self) -> None:
        require(self.damping >= 0, "damping must be >= 0 (0 = the library's default).")


@dataclasses.dataclass(frozen=True)
class Section:
    """One settings section of a method: its name, class and default (an instance, or a function
    of the sections resolved before it; None = the class's defaults)."""

    name: str
    cls: type[Settings]
    default: Settings | Callable[[dict[str, Settings]], Settings] | None = None

    def make_default(self, resolved: dict[str, Settings]) -> Settings:
        if self.default is None:
            return self.cls()
        return self.default(resolved) if callable(self.default) else self.default


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One registered method: its kind, a one-line description and its settings sections."""

    name: str
    kind: str
    description: str
    sections: tuple[Section, ...] = ()  # the first is the main section
    needs: tuple[str, ...] = ()  # importable modules the method needs
    install: str = ""  # the command that installs them

    def missing(self) -> str | None:
        """Why the method cannot run here (a missing package and its install command), or None."""
        absent = [m for m in self.needs if importlib.util.find_spec(m) is None]
        if not absent:
            return None
        return f"{', '.join(absent)} not installed: {self.install}"


def _fisher_default(resolved: dict[str, Settings]) -> FisherSettings:
    """The Fisher over the group covering the main section's group (one file serves several)."""
    main = next(iter(resolved.values()))
    return FisherSettings(group=covering_group(main.group))


_FISHER = Section("fisher", FisherSettings, _fisher_default)
_GRADS = Section("gradients", GradientSettings)
_DAMPED = Section("method", DampingSettings)


def _peer_specs() -> list[MethodSpec]:
    from linernotes.attribution.peers import INSTALL, PEER_METHODS

    descriptions = {
        "dattri-trak": "dattri's TRAK on the same Task, model and draws",
        "dattri-tracin": "dattri's TracIn (gradient dot products) on the same Task and draws",
        "kronfluence-identity": "kronfluence without preconditioning (gradient dot products)",
        "kronfluence-diagonal": "kronfluence influence with a diagonal Fisher",
        "kronfluence-kfac": "kronfluence influence with K-FAC factors",
        "kronfluence-ekfac": "kronfluence influence with EK-FAC factors",
    }
    specs = []
    for name in PEER_METHODS:
        lib = name.split("-")[0]
        # exact gradients, as the adapters default to; dattri's TRAK needs a projection
        grads = _GRADS if name == "dattri-trak" else Section(
            "gradients", GradientSettings, GradientSettings(projection_dim=0))
        specs.append(MethodSpec(name, "peer", descriptions.get(name, name),
                                (grads, Section("peer", PeerSettings)),
                                needs=(lib,), install=INSTALL[lib]))
    return specs


def _registry() -> dict[str, MethodSpec]:
    from linernotes.attribution.mucs import MucsSettings
    from linernotes.attribution.similarity import LpipsSettings

    specs = [
        MethodSpec("unlearning", "counterfactual",
                   "unlearn the query (one Newton step), credit = each track's relative loss "
                   "increase (--set kind=delta: the plain increase)",
                   (Section("unlearn", UnlearnSettings), Section("score", ScoreSettings),
                    _FISHER)),
        MethodSpec("unlearning-linear", "counterfactual",
                   "unlearning to first order: stored projected training gradients . one "
                   "preconditioned query gradient (fast for many queries)",
                   (Section("unlearn", UnlearnSettings), Section("score", ScoreSettings),
                    _FISHER, Section("projection", ProjectionSettings))),
        MethodSpec("mucs", "counterfactual",
                   "MUCS: mirrored (bounded) ascent on the query, credit = normalised loss skew",
                   (Section("mucs", MucsSettings), Section("score", ScoreSettings))),
        MethodSpec("trak", "gradient", "TRAK: projected loss gradients, kernel-preconditioned",
                   (_GRADS, _DAMPED)),
        MethodSpec("dtrak", "gradient", "D-TRAK: TRAK on the gradient of the squared output",
                   (_GRADS, _DAMPED)),
        MethodSpec("tracin", "gradient", "TracIn: dot product of loss gradients (one checkpoint)",
                   (_GRADS,)),
        MethodSpec("fisher-influence", "gradient",
                   "diagonal-Fisher influence: unlearning linearised to first order",
                   (_GRADS, _DAMPED, _FISHER)),
        MethodSpec("representer", "gradient",
                   "representer points: last layer's activations x output gradients",
                   (_GRADS, Section("method", RepresenterSettings))),
        MethodSpec("clap-audio", "similarity", "cosine of CLAP audio embeddings"),
        MethodSpec("clap-text", "similarity",
                   "cosine of the query caption's CLAP text embedding with each track's audio"),
        MethodSpec("basic-pitch", "similarity",
                   "cosine of pooled basic-pitch note activations (melody / identity)",
                   needs=("basic_pitch", "onnxruntime"),
                   install="pip install --no-deps basic-pitch && pip install onnxruntime"),
        MethodSpec("chroma-mfcc", "similarity", "cosine of z-scored chroma + MFCC statistics"),
        MethodSpec("lpips-dit", "similarity",
                   "LPIPS-style distance of the model's own block activations",
                   (Section("lpips", LpipsSettings),)),
        *_peer_specs(),
    ]
    return {s.name: s for s in specs}


METHODS: dict[str, MethodSpec] = _registry()
#: Short names for the peers' usual variants.
ALIASES = {"dattri": "dattri-trak", "kronfluence": "kronfluence-ekfac"}


def method_spec(name: str) -> MethodSpec:
    """The registered method `name` (or an alias); a clear error listing the names otherwise."""
    spec = METHODS.get(ALIASES.get(name, name))
    if spec is None:
        import difflib

        close = difflib.get_close_matches(name, [*METHODS, *ALIASES], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise LinernotesError(f"Unknown attribution method {name!r}.{hint} Choose one of "
                              f"{', '.join(METHODS)} (aliases: "
                              f"{', '.join(f'{a}={b}' for a, b in ALIASES.items())}); "
                              "`linernotes methods` describes them.")
    return spec


def methods_table() -> pd.DataFrame:
    """One row per method: name, kind, description and whether it can run here."""
    return pd.DataFrame([{"method": s.name, "kind": s.kind, "description": s.description,
                          "available": s.missing() or "yes"} for s in METHODS.values()])


# ---------------------------------------------------------------------------- settings


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _owners(spec: MethodSpec, field: str) -> list[str]:
    return [sec.name for sec in spec.sections if field in _fields(sec.cls)]


def setting_keys(name: str) -> dict[str, Any]:
    """The override keys of method `name` with their default values (in the key's form)."""
    spec = method_spec(name)
    resolved: dict[str, Settings] = {}
    out: dict[str, Any] = {}
    for i, sec in enumerate(spec.sections):
        value = resolved[sec.name] = sec.make_default(resolved)
        for field in _fields(sec.cls):
            bare = i == 0 or (field not in _fields(spec.sections[0].cls)
                              and _owners(spec, field) == [sec.name])
            out[field if bare else f"{sec.name}.{field}"] = getattr(value, field)
    return out


def _place(spec: MethodSpec, key: str) -> tuple[str, str]:
    """(section, field) of an override key, or a clear error listing the valid keys."""
    def unknown() -> LinernotesError:
        if not spec.sections:
            return LinernotesError(f"Method {spec.name} takes no settings (got {key!r}).")
        return LinernotesError(
            f"Unknown setting {key!r} for method {spec.name}. Valid keys: "
            f"{', '.join(setting_keys(spec.name))} (`linernotes methods {spec.name}`).")

    classes = {sec.name: sec.cls for sec in spec.sections}
    if "." in key:
        section, field = key.split(".", 1)
        if section not in classes or field not in _fields(classes[section]):
            raise unknown()
        return section, field
    owners = _owners(spec, key)
    if not owners:
        raise unknown()
    main = spec.sections[0].name
    if main in owners or len(owners) == 1:
        return (main if main in owners else owners[0]), key
    raise LinernotesError(f"Setting {key!r} of method {spec.name} is ambiguous: write "
                          f"{' or '.join(f'{s}.{key}' for s in owners)}.")


def resolve_settings(
    name: str, overrides: Mapping[str, Any] | None = None,
    base: Mapping[str, Settings | None] | None = None,
) -> dict[str, Settings]:
    """Each section's settings for method `name`: `base` (or the default), then `overrides`."""
    spec = method_spec(name)
    classes = {sec.name: sec.cls for sec in spec.sections}
    base = {k: v for k, v in (base or {}).items() if v is not None}
    unused = sorted(set(base) - set(classes))
    if unused:
        raise LinernotesError(f"Method {spec.name} has no {', '.join(unused)} settings; give "
                              f"its settings as overrides (`linernotes methods {spec.name}`).")
    changes: dict[str, dict[str, Any]] = {sec: {} for sec in classes}
    for key, value in (overrides or {}).items():
        section, field = _place(spec, key)
        changes[section][field] = classes[section].coerce(field, value, f"--set {key}")
    resolved: dict[str, Settings] = {}
    for sec in spec.sections:
        start = base.get(sec.name) or sec.make_default(resolved)
        if not isinstance(start, sec.cls):
            raise LinernotesError(f"{spec.name}: {sec.name} settings must be a "
                                  f"{sec.cls.__name__}, not {type(start).__name__}.")
        try:
            resolved[sec.name] = start.replace(**changes[sec.name]) if changes[sec.name] else start
        except LinernotesError as exc:
            raise LinernotesError(f"{spec.name} settings: {exc}") from None
    return resolved


# ---------------------------------------------------------------------------- the factory


def make_attributor(
    name: str, run, manifest: pd.DataFrame, train_set: tuple | None = None,
    overrides: Mapping[str, Any] | None = None,
    base: Mapping[str, Settings | None] | None = None, progress: bool = True,
) -> Attributor:
    """Build method `name` (see METHODS) for `run`; its `spec` and resolved `sections` are set.

    `train_set`: the run's `(store, dataset, track ids)` from `Run.train_set`, if already made.
    `base`: starting settings per section (e.g. {"unlearn": UnlearnSettings(...)});
    `overrides`: a flat dict of changes, validated against the method's Settings classes.
    """
    spec = method_spec(name)
    settings = resolve_settings(spec.name, overrides, base)
    why = spec.missing()
    if why:
        raise LinernotesError(f"Method {spec.name} cannot run here: {why}")
    builder = {"counterfactual": _unlearning, "gradient": _gradient, "similarity": _similarity,
               "peer": _peer}[spec.kind]
    attributor = builder(spec, run, manifest, train_set, settings, progress)
    attributor.spec, attributor.sections = spec, settings
    return attributor


def _train(run, manifest, train_set, progress):
    return train_set if train_set is not None else run.train_set(manifest, progress)


def _unlearning(spec, run, manifest, train_set, s, progress):
    from linernotes.attribution.unlearning import UnlearningAttributor

    _, train, ids = _train(run, manifest, train_set, progress)
    if spec.name == "mucs":
        from linernotes.attribution.mucs import MucsAttributor

        return MucsAttributor(run, manifest, train, ids, run.cache_dir, s["mucs"], s["score"],
                              progress)
    fisher = run.fisher(manifest, s["fisher"], progress)
    if spec.name == "unlearning-linear":
        from linernotes.attribution.linear import LinearUnlearningAttributor

        return LinearUnlearningAttributor(run.task, run.model, run.hash, manifest, train, ids,
                                          fisher, run.cache_dir, s["score"], progress,
                                          unlearn=s["unlearn"], **s["projection"].to_dict())
    return UnlearningAttributor(run.task, run.model, run.hash, manifest, train, ids, fisher,
                                run.cache_dir, s["score"], progress, unlearn=s["unlearn"])


def _gradient(spec, run, manifest, train_set, s, progress):
    from linernotes.attribution.gradient_methods import GRADIENT_METHODS

    _, train, ids = _train(run, manifest, train_set, progress)
    cls = GRADIENT_METHODS[spec.name]
    args = (run.task, run.model, run.hash, manifest, train, ids)
    g, extra = s["gradients"], s.get("method")
    if spec.name in ("trak", "dtrak"):
        return cls(*args, run.cache_dir, g, damping=extra.damping, progress=progress)
    if spec.name == "fisher-influence":
        fisher = run.fisher(manifest, s["fisher"], progress)
        return cls(*args, fisher, run.cache_dir, g, damping=extra.damping, progress=progress)
    if spec.name == "representer":
        return cls(*args, run.cache_dir, g, layer=extra.layer or None, progress=progress)
    return cls(*args, run.cache_dir, g, progress=progress)


def _similarity(spec, run, manifest, train_set, s, progress):
    from linernotes.attribution.similarity import similarity_method

    kwargs = {"settings": s["lpips"]} if "lpips" in s else {}
    return similarity_method(spec.name, run, manifest, progress=progress, **kwargs)


def _peer(spec, run, manifest, train_set, s, progress):
    from linernotes.attribution.peers import PeerAttributor

    _, train, ids = _train(run, manifest, train_set, progress)
    return PeerAttributor(spec.name, run.task, run.model, run.hash, manifest, train, ids,
                          run.cache_dir / "peers", settings=s["gradients"],
                          damping=s["peer"].damping or None, progress=progress)
