"""The nightly watch list: which Hub models to follow, which recipes to make of each, and where to publish.

Frozen dataclasses validated on construction; `WatchList.from_dict` takes the parsed YAML and rejects
unknown keys, naming the field. Recipes are checked with wq's own job config classes, so a recipe the
quantize job would refuse is refused here, before anything is submitted. Reading the file is the job's.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from dataclasses import dataclass, fields
from typing import Any, Literal, Mapping

from wq_ops.config import (
    BUNDLED_CALIB,
    Format,
    JobConfig,
    Method,
    QuantConfig,
    RunConfig,
    Scheme,
    parse_enum,
    positive_int,
)
from wq_ops.errors import ConfigError

__all__ = ["Recipe", "WatchEntry", "JobResources", "WatchList", "DESTINATION_FIELDS", "render_destination"]

# Placeholders a destination template may use ({owner}/{name} are the source repo id's halves).
DESTINATION_FIELDS = ("owner", "name", "recipe", "method", "bits", "group_size", "format")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_RECIPE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# A recipe's group_size when its YAML gives none: the job's default for its scheme (None already means a group
# per row, so it cannot mark "not given").
JOB_DEFAULT: Literal["job default"] = "job default"


def _check_keys(where: str, data: Any, cls: type) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, found {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; "
                          f"known keys: {', '.join(sorted(known))}")
    return data


@dataclass(frozen=True)
class Recipe:
    """One artifact to make of each watched model: the quantize job's scheme, algorithm and calibration flags.
    method, bits, group_size, sym: None takes the job's default (the scheme's; without one, GPTQ W4 g128
    symmetric). model_free: the day-0 path, no calibration (e.g. FP8_DYNAMIC tonight, GPTQ once supported)."""

    name: str
    scheme: Scheme | None = None
    method: Method | None = None
    bits: int | None = None
    group_size: int | Literal["job default"] | None = JOB_DEFAULT   # None: one group per row ('channel' in YAML)
    format: Format = Format.COMPRESSED_TENSORS
    sym: bool | None = None
    model_free: bool = False
    calib: str | None = None           # path as the cluster sees it; required but with model_free
    samples: int | None = None         # None: the quantize job's default
    seq_len: int | None = None         # None: the quantize job's default
    eval: str | None = None            # text to score each artifact's perplexity on (--eval), as the cluster sees it
    eval_baseline: bool = False        # also score the source model (--eval-baseline)
    eval_max_windows: int | None = None   # None: every whole window of the text

    def __post_init__(self) -> None:
        where = f"recipes.{self.name}"
        if not isinstance(self.name, str) or not _RECIPE_NAME.match(self.name):
            raise ConfigError(f"recipe name {self.name!r}: expected letters, digits, '.', '_' or '-'")
        if self.scheme is not None:
            object.__setattr__(self, "scheme", parse_enum(Scheme, self.scheme, f"{where}.scheme"))
        if self.method is not None:
            object.__setattr__(self, "method", parse_enum(Method, self.method, f"{where}.method"))
        object.__setattr__(self, "format", parse_enum(Format, self.format, f"{where}.format"))
        if isinstance(self.group_size, str) and self.group_size != JOB_DEFAULT:
            if self.group_size.strip().lower() != "channel":
                raise ConfigError(f"{where}.group_size={self.group_size!r}: expected an integer or 'channel'")
            object.__setattr__(self, "group_size", None)
        for flag in ("sym", "model_free"):
            if getattr(self, flag) is not None and not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{where}.{flag}={getattr(self, flag)!r}: expected true or false")
        if self.calib is not None and (not isinstance(self.calib, str) or not self.calib):
            raise ConfigError(f"{where}.calib={self.calib!r}: expected a path")
        if self.calib is None and not self.model_free:   # real models: the bundled text is not for them
            raise ConfigError(f"{where}.calib: missing; give the calibration text every watched model is quantized "
                              "with, a path the cluster's pods can read (e.g. /data/calib/wikitext-2-train.txt on "
                              f"the shared volume), or '{BUNDLED_CALIB}' for wq's bundled demo text")
        try:   # the quantize job's own checks, so a bad recipe fails here rather than on the cluster
            object.__setattr__(self, "_quant", JobConfig.from_dict(
                {"model": "org/model", "out": "out", **self._options()}).quant)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def _options(self) -> dict[str, Any]:
        """The quantize job's options this recipe gives (those left to the job's defaults are absent)."""
        given: dict[str, Any] = {"scheme": self.scheme, "method": self.method, "bits": self.bits, "sym": self.sym,
                 "format": self.format, "calib": self.calib, "samples": self.samples, "seq_len": self.seq_len,
                 "eval": self.eval, "eval_max_windows": self.eval_max_windows}
        options = {k: v for k, v in given.items() if v is not None}
        if self.group_size != JOB_DEFAULT:
            options["group_size"] = self.group_size
        if self.model_free:
            options["model_free"] = True
        if self.eval_baseline:
            options["eval_baseline"] = True
        return options

    @property
    def quant(self) -> QuantConfig:
        """What the job will quantize with: the recipe's options over the job's defaults."""
        quant: QuantConfig = getattr(self, "_quant")
        return quant

    @property
    def fingerprint(self) -> str:
        """Hash of every option that changes the artifact: a recipe edited under the same name is new work. The
        grid enters as the job will run it (a recipe written before schemes existed keeps its hash); the scheme
        and the model-free path only where given."""
        quant = self.quant
        options: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)
                                   if f.name not in ("name", "scheme", "model_free")}
        options.update(method=quant.method, bits=quant.bits, group_size=quant.group_size, sym=quant.sym)
        if self.scheme is not None:
            options["scheme"] = self.scheme
        if self.model_free:
            options["model_free"] = True
        text = json.dumps(options, sort_keys=True, default=lambda v: v.value)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def flags(self) -> list[str]:
        """The quantize command line's flags for this recipe: the grid spelled out where no scheme is named (as
        before schemes existed), else the scheme and only what the recipe changes of it."""
        quant = self.quant
        out = ["--scheme", self.scheme.value] if self.scheme is not None else []
        if self.model_free:
            out.append("--model-free")
        if self.scheme is None or self.method is not None:
            out += ["--method", quant.method.value]
        if self.scheme is None or self.bits is not None:
            out += ["--bits", str(quant.bits)]
        if self.scheme is None or self.group_size != JOB_DEFAULT:
            out += ["--group-size", "channel" if quant.group_size is None else str(quant.group_size)]
        out += ["--format", self.format.value]
        if not quant.sym and (self.scheme is None or self.sym is not None):
            out.append("--asym")
        if self.calib is not None:
            out += ["--calib", self.calib]
        if self.samples is not None:
            out += ["--samples", str(self.samples)]
        if self.seq_len is not None:
            out += ["--seq-len", str(self.seq_len)]
        if self.eval is not None:
            out += ["--eval", self.eval] + (["--eval-baseline"] if self.eval_baseline else [])
        if self.eval_max_windows is not None:
            out += ["--eval-max-windows", str(self.eval_max_windows)]
        return out

    @classmethod
    def from_dict(cls, name: str, data: Any) -> "Recipe":
        data = _check_keys(f"recipes.{name}", data, cls)
        if "name" in data:
            raise ConfigError(f"recipes.{name}.name: the recipe's name is its key; remove 'name'")
        return cls(name=name, **data)


@dataclass(frozen=True)
class JobResources:
    """What each quantize job asks of the cluster: the quantize command's actor flags."""

    actors: int = 1
    gpus_per_actor: float = 0.0        # 0: actors run on CPU
    cpus_per_actor: int = 1

    def __post_init__(self) -> None:
        try:
            RunConfig(actors=self.actors, gpus_per_actor=self.gpus_per_actor, cpus_per_actor=self.cpus_per_actor)
        except ConfigError as e:
            raise ConfigError(f"resources: {e}") from None

    def flags(self) -> list[str]:
        return ["--actors", str(self.actors), "--gpus-per-actor", f"{self.gpus_per_actor:g}",
                "--cpus-per-actor", str(self.cpus_per_actor)]


def _check_template(where: str, template: Any) -> str:
    if not isinstance(template, str) or not template:
        raise ConfigError(f"{where}={template!r}: expected a template like '{{owner}}-quantized/{{name}}-{{recipe}}'")
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ConfigError(f"{where}={template!r}: not a valid template ({e})") from None
    bad = sorted({n for n in names if n not in DESTINATION_FIELDS})
    if bad:
        raise ConfigError(f"{where}={template!r}: unknown placeholder(s) {', '.join('{' + b + '}' for b in bad)}; "
                          f"known: {', '.join('{' + f + '}' for f in DESTINATION_FIELDS)}")
    if "name" not in names:
        raise ConfigError(f"{where}={template!r}: must contain {{name}}, or every watched model would publish "
                          "to the same repo")
    return template


def render_destination(template: str, *, repo_id: str, recipe: Recipe) -> str:
    """The destination repo id for `repo_id` made with `recipe`. Raises ConfigError if it is not an org/name."""
    owner, name = repo_id.split("/", 1)
    quant = recipe.quant
    dest = template.format(owner=owner, name=name, recipe=recipe.name, method=quant.method.value,
                           bits=quant.bits, group_size="channel" if quant.group_size is None else quant.group_size,
                           format=recipe.format.value)
    if not _REPO_ID.match(dest):
        raise ConfigError(f"destination {template!r} gives {dest!r} for {repo_id} with recipe {recipe.name}: "
                          "not a Hub repo id (org/name)")
    return dest


@dataclass(frozen=True)
class WatchEntry:
    """One line of the watch list: a single repo, or every repo of `author` whose name matches `pattern`."""

    recipes: tuple[str, ...]
    repo: str | None = None
    author: str | None = None
    pattern: str = "*"                 # fnmatch pattern on the repo name (after the '/'); only with author
    destination: str | None = None     # None: the watch list's default template

    def __post_init__(self) -> None:
        where = f"watch[{self.repo or self.author}]"
        if (self.repo is None) == (self.author is None):
            raise ConfigError(f"{where}: give exactly one of 'repo' (org/name) or 'author' (with 'pattern')")
        if self.repo is not None:
            if not isinstance(self.repo, str) or not _REPO_ID.match(self.repo):
                raise ConfigError(f"{where}.repo={self.repo!r}: expected a Hub repo id (org/name)")
            if self.pattern != "*":
                raise ConfigError(f"{where}.pattern: only with 'author'; a 'repo' entry names one model")
        if self.author is not None and (not isinstance(self.author, str) or "/" in self.author or not self.author):
            raise ConfigError(f"{where}.author={self.author!r}: expected a user or organisation name")
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ConfigError(f"{where}.pattern={self.pattern!r}: expected an fnmatch pattern such as 'Llama-3*'")
        if isinstance(self.recipes, str) or not isinstance(self.recipes, (list, tuple)) or not self.recipes:
            raise ConfigError(f"{where}.recipes={self.recipes!r}: expected a non-empty list of recipe names")
        object.__setattr__(self, "recipes", tuple(self.recipes))
        if len(set(self.recipes)) != len(self.recipes):
            raise ConfigError(f"{where}.recipes={list(self.recipes)}: a recipe is listed twice")
        if self.destination is not None:
            _check_template(f"{where}.destination", self.destination)

    @property
    def label(self) -> str:
        return self.repo if self.repo is not None else f"{self.author}/{self.pattern}"

    @classmethod
    def from_dict(cls, index: int, data: Any) -> "WatchEntry":
        return cls(**_check_keys(f"watch[{index}]", data, cls))


@dataclass(frozen=True)
class WatchList:
    """The whole watch list file. publish: push each artifact to its destination repo (the quantize job's
    --push-to-hub); off, artifacts stay under the artifacts directory only."""

    recipes: tuple[Recipe, ...]
    watch: tuple[WatchEntry, ...]
    destination: str = "{owner}/{name}-{recipe}"
    publish: bool = True
    private: bool = False              # new destination repos are private
    resources: JobResources = JobResources()
    max_attempts: int = 3              # a (model, revision, recipe) that failed this often is left for a person
    max_concurrent_jobs: int = 2       # quantize jobs in flight on the cluster at once
    job_timeout_s: float = 12 * 3600.0   # a job running longer is stopped and counted as a failed attempt

    def __post_init__(self) -> None:
        object.__setattr__(self, "recipes", tuple(self.recipes))
        object.__setattr__(self, "watch", tuple(self.watch))
        if not self.recipes:
            raise ConfigError("recipes: empty; define at least one recipe")
        if not self.watch:
            raise ConfigError("watch: empty; list at least one repo or author")
        names = [r.name for r in self.recipes]
        if len(set(names)) != len(names):
            raise ConfigError(f"recipes: duplicate names in {names}")
        for entry in self.watch:
            missing = sorted(set(entry.recipes) - set(names))
            if missing:
                raise ConfigError(f"watch[{entry.label}].recipes: no recipe named {', '.join(missing)}; "
                                  f"defined: {', '.join(names)}")
        _check_template("destination", self.destination)
        for flag in ("publish", "private"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag}={getattr(self, flag)!r}: expected true or false")
        positive_int(self.max_attempts, "max_attempts")
        positive_int(self.max_concurrent_jobs, "max_concurrent_jobs")
        if isinstance(self.job_timeout_s, bool) or not isinstance(self.job_timeout_s, (int, float)) \
                or self.job_timeout_s <= 0:
            raise ConfigError(f"job_timeout_s={self.job_timeout_s!r}: expected a positive number of seconds")

    def recipe(self, name: str) -> Recipe:
        return next(r for r in self.recipes if r.name == name)

    def destination_for(self, entry: WatchEntry, repo_id: str, recipe: Recipe) -> str:
        return render_destination(entry.destination or self.destination, repo_id=repo_id, recipe=recipe)

    @classmethod
    def from_dict(cls, data: Any) -> "WatchList":
        """Build from the parsed YAML file. Unknown keys anywhere are an error naming them."""
        data = dict(_check_keys("watch list", data, cls))
        recipes = data.pop("recipes", None)
        if not isinstance(recipes, Mapping):
            raise ConfigError("recipes: expected a mapping of recipe name -> options "
                              "(e.g. gptq-w4: {method: gptq, bits: 4, group_size: 128})")
        watch = data.pop("watch", None)
        if not isinstance(watch, list):
            raise ConfigError("watch: expected a list of entries (each with 'repo' or 'author', and 'recipes')")
        if "resources" in data:
            data["resources"] = JobResources(**_check_keys("resources", data["resources"], JobResources))
        return cls(recipes=tuple(Recipe.from_dict(str(k), v) for k, v in recipes.items()),
                   watch=tuple(WatchEntry.from_dict(i, w) for i, w in enumerate(watch)), **data)
