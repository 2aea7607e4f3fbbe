"""The full-run driver (12_driver.py): which stages a method needs, when a stage may be skipped, and running
each stage as its own process with its output teed into outputs/<run_id>/driver_logs/<stage>.log.

The plan for `--method M` is 00 -> 01 -> 02 -> 03 -> (04 -> 08 for dpo) -> the method stages (05 ppo, 06 grpo,
07 rloo, 09 dpo) -> 10 for base, sft and each method -> 11 over this run's metrics; 04 also runs before an RL
method set to train on the prompts its candidates select (--set grpo.algorithm.train_prompts=mixed).
`--method none` is the SFT-only path; `--method grpo,dpo` several methods; `--method all` every method.
A variant (utils/stages.py: grpo_dr, grpo_mixed) is planned when named (`--method grpo,grpo_dr`): it runs its
method's script with --output_dir at its own folder and its overrides as the first --set, and 10 evaluates it
under its own label.

Flag pass-through (`--set`, repeatable, applied in the order given):
  --set KEY=VALUE               every stage of the plan whose configuration has KEY (e.g. model.path,
                                generation.max_new_tokens, algorithm.steps -> the methods that have it).
                                A key that no stage of the plan has is an error, never a silent no-op.
  --set STAGE.KEY=VALUE         that stage only; STAGE is its folder (03_sft, 10_evaluation), its script
                                name (03_sft_train), its number (03) or its key (sft, ppo, grpo, rloo, dpo,
                                rewards, ...); `10_evaluation/grpo` targets one evaluation. When the first
                                part is also a configuration section (candidates, evaluation) it is read as a
                                key: use 04 / 10 to name those stages.
  --stage_config STAGE=FILE     the stage's --algo_config (e.g. --stage_config grpo=configs/algorithms/x.yaml);
                                08 and 09 both read dpo.yaml: --stage_config 08=F --stage_config 09=F.
11_compare_runs.py has its own keys (baseline, n_bootstrap, confidence): --set 11.n_bootstrap=500.
paths.outputs_dir may only be set for every stage at once (the run folder must be one place).
  --preset NAME                 configs/presets/NAME.yaml's `set:` entries before the command line's (which
                                win); those for stages outside the plan are left out. `--preset cpu`: the study.
  --launcher COMMAND            the stages that run on several processes (utils/stages.py multi_process: 03-07,
                                09, 10) under COMMAND, e.g. "torchrun --standalone --nproc_per_node 2" on a CPU or
                                "accelerate launch --num_processes 8" on GPUs; a different process count re-runs them.

Skip rules, evaluated in plan order. A stage is up to date when all of these hold:
  1. its manifest.json says completed;
  2. its recorded seed and configuration equal what the driver resolves now for it (utils.config.load_config
     with the same files, --quick_test and overrides; the driver computes this without running the stage); a key
     added to the YAMLs since the stage ran, at a null or {} default (what it did before), is no change;
  3. every recorded input still hashes to its recorded sha256 (utils.runs.sha256_path) and every recorded
     output still exists.
Otherwise it re-runs: with --overwrite when its folder is not empty, or, for a stage that resumes (utils/stages.py
resume: 03, 05, 06, 07 and their variants), with --resume when its manifest
is unfinished (interrupted, even by kill -9) but its configuration, seed and inputs are unchanged and it has a
trainer checkpoint. What depends on a re-run stage is marked to re-run in the plan (and in --dry_run), since its
inputs are about to change. Dependencies follow the data: 03 reads 01 and 02, 04 and the methods read 03, 08
reads 04, 09 reads 08, 10/<label> reads the checkpoint it scores, 11 reads every 10; and any earlier stage whose
folder or outputs hold one of a stage's recorded inputs. When running, every later stage is checked again by
rules 1-3 once an upstream stage has run: it re-runs when that changed its inputs (any training does), and is
skipped when the upstream stage reproduced byte-identical outputs (e.g. 02 re-run on the same weights).
--rerun STAGE re-runs a stage even when it is up to date.
"""
from __future__ import annotations

import argparse
import codecs
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from utils import vllm_engine
from utils.cli import DEFAULT_MODEL_CONFIG, UsageError
from utils.compare import comparison_config
from utils.config import ConfigError, config_diff, get_key, load_config, load_yaml, parse_override
from utils.evaluations import completed_metrics_files
from utils.files import FolderLock, open_no_follow, read_json
from utils.runs import REPO_ROOT, STAGE_FOLDERS, StageError, enclosing_stage, is_stage_folder, now_iso, read_manifest, \
    peak_gpu_mib, run_root, sha256_path, write_json_atomic
from utils.stages import METHODS, RL_METHODS, STAGES, VARIANTS

F = STAGE_FOLDERS
LOG_TAIL_LINES = 40


@dataclass(frozen=True)
class StageSpec:
    """One entry of the plan: a stage script run once (10_evaluate.py once per label)."""

    name: str                 # folder under the run: "03_sft", "10_evaluation/grpo"
    key: str                  # its key in utils/stages.py: "sft", "evaluation", "grpo_dr", ...
    script: str
    depends: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()
    label: str | None = None  # evaluations only

    @property
    def number(self) -> str:
        return self.name[:2]

    @property
    def stage(self):
        return STAGES[self.key]

    @property
    def is_model_stage(self) -> bool:
        return self.key != "comparison"

    @property
    def log_name(self) -> str:
        return self.name.replace("/", "_")


def parse_methods(text: str) -> list[str]:
    """Method keys in registry order: `all` = every method, `none` = SFT only; a variant only by its name."""
    methods: list[str] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part == "all":
            methods.extend(METHODS)
        elif part == "none":
            continue
        elif part in METHODS or part in VARIANTS:
            methods.append(part)
        else:
            raise UsageError(f"--method: unknown method '{part}' (choose from {', '.join(METHODS)}, all, none; "
                             f"variants: {', '.join(VARIANTS)})")
    return [key for key in STAGES if key in methods]


def build_plan(methods: list[str], base_eval: bool = True, candidates_for: tuple[str, ...] = ()) -> list[StageSpec]:
    """Every stage the methods need, in the order they run. candidates_for: the RL methods that train on the
    prompts 04's candidates select (algorithm.train_prompts mixed): 04 runs before them and they read it."""
    readers = [m for m in RL_METHODS if m in methods and m in candidates_for]
    keys = ["check_data", "prepare", "rewards", "sft"]
    if "dpo" in methods or readers:
        keys.append("candidates")
    keys += [m for m in RL_METHODS if m in methods]
    if "dpo" in methods:
        keys += ["preferences", "dpo"]
    plan = [StageSpec(F[key], key, STAGES[key].script,
                      tuple(F[read] for read in STAGES[key].reads) + ((F["candidates"],) if key in readers else ()))
            for key in keys]
    labels = (["base"] if base_eval else []) + ["sft"] + methods
    evaluations = []
    for label in labels:
        depends = (F["prepare"], F["rewards"]) + (() if label == "base" else (F[label],))
        extra = ("--base", "--label", "base") if label == "base" else ("--label", label)
        evaluations.append(StageSpec(f"{F['evaluation']}/{label}", "evaluation", STAGES["evaluation"].script, depends,
                                     extra, label))
    plan += evaluations
    plan.append(StageSpec(F["comparison"], "comparison", STAGES["comparison"].script,
                          tuple(spec.name for spec in evaluations)))
    return plan


def _aliases(spec: StageSpec) -> set[str]:
    names = {spec.name, spec.number, Path(spec.script).stem, spec.key}
    if spec.label is not None:
        names |= {spec.name.split("/")[0], f"{spec.number}/{spec.label}"}
    return names


# every name a stage of the registry goes by (key, folder, number, script), planned or not
REGISTRY_NAMES = {name for stage in STAGES.values()
                  for name in (stage.key, stage.folder, stage.number, Path(stage.script).stem)}


def matches(spec: StageSpec, selector: str) -> bool:
    return selector.strip() in _aliases(spec)


def resolve_selector(plan: list[StageSpec], selector: str, flag: str) -> list[StageSpec]:
    found = [spec for spec in plan if matches(spec, selector)]
    if not found:
        raise UsageError(f"{flag}: no stage '{selector}' in this plan ({', '.join(s.name for s in plan)})")
    return found


def plan_and_resolver(methods: list[str], settings: "DriverSettings", base_eval: bool = True):
    """The plan and its Resolver. Whether 04 joins the plan for an RL method depends on that method's resolved
    configuration (train_prompts mixed with no candidate_scores given), so a first Resolver over the plan with
    04 in it reads those configurations."""
    probe = Resolver(settings, build_plan(methods, base_eval, candidates_for=RL_METHODS))
    readers = []
    for spec in probe.plan:
        config = probe.config_or_error(spec) if spec.key in RL_METHODS else None
        if isinstance(config, dict) and config["algorithm"].get("train_prompts") == "mixed" \
                and not config["algorithm"].get("candidate_scores"):
            readers.append(spec.key)
    plan = build_plan(methods, base_eval, candidates_for=tuple(readers))
    return plan, Resolver(settings, plan)


def select_stages(plan: list[StageSpec], stages: str | None, until: str | None) -> list[StageSpec]:
    """--stages A,B,... keeps those entries; --until X stops after the last entry X names."""
    selected = plan
    if stages:
        wanted = {spec.name for sel in stages.split(",") if sel.strip()
                  for spec in resolve_selector(plan, sel, "--stages")}
        selected = [spec for spec in plan if spec.name in wanted]
    if until:
        last = max(plan.index(spec) for spec in resolve_selector(plan, until, "--until"))
        selected = [spec for spec in selected if plan.index(spec) <= last]
    return selected


@dataclass
class DriverSettings:
    config: str
    run_id: str
    seed: int
    quick_test: bool
    overrides: list[str] = field(default_factory=list)       # as given on the command line
    stage_configs: list[str] = field(default_factory=list)   # STAGE=FILE
    preset: list[str] = field(default_factory=list)          # --preset's --set entries, applied first
    launcher: str | None = None                              # --launcher, for the stages that run under one

    @property
    def processes(self) -> int | None:
        """The processes --launcher asks for (1 without a launcher; None when it does not say). As `accelerate launch`
        does: --num_processes wins over the --config_file's num_processes; a config file without one (or -1) is a
        ConfigError, since accelerate 1.15 then stops for want of --num_processes (it takes the GPU count only when
        there is no config file)."""
        if not self.launcher:
            return 1
        parts = shlex.split(self.launcher)

        def value(*flags: str) -> str | None:
            for index, part in enumerate(parts):
                if part in flags and index + 1 < len(parts):
                    return parts[index + 1]
                if part.split("=", 1)[0] in flags and "=" in part:
                    return part.split("=", 1)[1]
            return None

        given = value("--num_processes", "--num-processes", "--nproc_per_node", "--nproc-per-node")
        if given is not None:
            return int(given)
        config_file = value("--config_file", "--config-file")  # accelerate's config file (configs/accelerate/*.yaml)
        if config_file is None:
            return None
        config = load_yaml(config_file)
        count = config.get("num_processes")
        if count is None and config.get("distributed_type") == "NO":
            return 1  # accelerate's own default for a single-process config
        if count is None or count == -1:
            raise ConfigError(f"{config_file} leaves num_processes to the command line and accelerate launch stops "
                              f"without it: add --num_processes N (the GPUs to use) to the launcher")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"{config_file}: num_processes must be a whole number >= 1, got {count!r}")
        return count


class Resolver:
    """Turns the driver's flags into each stage's command-line pieces and resolved configuration."""

    def __init__(self, settings: DriverSettings, plan: list[StageSpec]):
        self.settings = settings
        self.plan = plan
        self.algo: dict[str, str | None] = {spec.name: spec.stage.algo_config for spec in plan}
        for item in settings.stage_configs:
            if "=" not in item:
                raise UsageError(f"--stage_config expects STAGE=FILE, got '{item}'")
            selector, file = item.split("=", 1)
            for spec in resolve_selector(plan, selector, "--stage_config"):
                if self.algo[spec.name] is None:
                    raise UsageError(f"--stage_config {item}: {spec.name} takes no --algo_config")
                self.algo[spec.name] = file
        self._base: dict[str, dict | Exception] = {}
        model = self._model_base()
        shared = [text for text in settings.preset + settings.overrides if self._applies(text, model)]
        outputs_dir = load_config(settings.config, None, settings.quick_test, shared)["paths"]["outputs_dir"]
        self.run_root = run_root(settings.run_id, outputs_dir)
        self.comparison_inputs = [str(self.run_root)]  # 11 compares this run's evaluations
        self.overrides = self._split_overrides(settings.preset + settings.overrides, n_preset=len(settings.preset))

    def _model_base(self) -> dict:
        if "__model__" not in self._base:
            self._base["__model__"] = load_config(self.settings.config, None, self.settings.quick_test)
        return self._base["__model__"]

    def base_config(self, spec: StageSpec) -> dict | Exception:
        """The stage's configuration before overrides (an exception when its files are missing or bad)."""
        if spec.name not in self._base:
            try:
                if spec.is_model_stage:
                    self._base[spec.name] = load_config(self.settings.config, self.algo[spec.name],
                                                        self.settings.quick_test,
                                                        algo_defaults=spec.stage.algo_defaults)
                else:
                    self._base[spec.name] = comparison_config(self.comparison_inputs, [])
            except (ConfigError, StageError) as err:
                self._base[spec.name] = err
        return self._base[spec.name]

    @staticmethod
    def _applies(text: str, config: dict | Exception) -> bool:
        if isinstance(config, Exception):
            return False
        try:
            get_key(config, parse_override(text)[0])
            return True
        except ConfigError:
            return False

    def _split_overrides(self, overrides: list[str], n_preset: int = 0) -> dict[str, list[str]]:
        # in order: the preset's entries, a variant's own overrides (utils/stages.py: what the variant is, so a
        # preset's budget for every method does not undo it), then the command line's --set, which wins
        per_stage: dict[str, list[str]] = {spec.name: [] for spec in self.plan}
        for index, text in enumerate(overrides):
            if index == n_preset:
                for spec in self.plan:
                    per_stage[spec.name] += spec.stage.overrides
            key, _ = parse_override(text)
            head, _, rest = key.partition(".")
            targets = [spec for spec in self.plan if self._applies(text, self.base_config(spec))]
            prefixed = [spec for spec in self.plan if matches(spec, head)] if rest else []
            if targets:  # a configuration key (wins over a stage name that is also a section)
                for spec in targets:
                    per_stage[spec.name].append(text)
            elif prefixed:
                if rest == "paths.outputs_dir":
                    raise UsageError(f"--set {text}: paths.outputs_dir can only be set for every stage")
                for spec in prefixed:
                    per_stage[spec.name].append(f"{rest}={text.split('=', 1)[1]}")
            elif index < n_preset and head in REGISTRY_NAMES:
                continue  # a preset covers every method: its entries for stages outside this plan do not apply
            else:
                known = [spec.name for spec in self.plan if isinstance(self.base_config(spec), Exception)]
                hint = f" (configs of {', '.join(known)} could not be read)" if known else ""
                raise UsageError(f"--set {text}: no stage of this plan has config key '{key}' and "
                                 f"'{head}' names no stage{hint}")
        if len(overrides) <= n_preset:  # no --set of the command line: the variants' overrides come last
            for spec in self.plan:
                per_stage[spec.name] += spec.stage.overrides
        return per_stage

    def config_or_error(self, spec: StageSpec) -> dict | Exception:
        try:
            return self.config(spec)
        except (ConfigError, UsageError, StageError) as err:
            return err

    def config(self, spec: StageSpec) -> dict:
        base = self.base_config(spec)
        if isinstance(base, Exception):
            raise base
        if spec.is_model_stage:
            return load_config(self.settings.config, self.algo[spec.name], self.settings.quick_test,
                               self.overrides[spec.name], algo_defaults=spec.stage.algo_defaults)
        return comparison_config(self.comparison_inputs, self.overrides[spec.name])

    def stage_dir(self, spec: StageSpec) -> Path:
        return self.run_root / spec.name

    def command(self, spec: StageSpec, mode: str) -> list[str]:
        script = spec.script if Path.cwd().resolve() == REPO_ROOT else str(REPO_ROOT / spec.script)
        cmd = [sys.executable, script]
        if self.settings.launcher and spec.stage.multi_process:
            launcher = shlex.split(self.settings.launcher)
            # this Python's accelerate / torchrun, whether the environment is activated or not
            if launcher[:2] == ["accelerate", "launch"]:
                launcher = [sys.executable, "-m", "accelerate.commands.launch", *launcher[2:]]
            elif launcher[:1] == ["torchrun"]:
                launcher = [sys.executable, "-m", "torch.distributed.run", *launcher[1:]]
            cmd = [*launcher, script]
        if spec.is_model_stage:
            cmd += ["--config", self.settings.config]
            if self.algo[spec.name]:
                cmd += ["--algo_config", self.algo[spec.name]]
            cmd += ["--run_id", self.settings.run_id, "--seed", str(self.settings.seed)]
            if spec.stage.folder != spec.stage.default_folder:  # a variant: its script's method writes elsewhere
                cmd += ["--output_dir", str(self.stage_dir(spec))]
            if self.settings.quick_test:
                cmd.append("--quick_test")
        else:
            cmd += [*self.comparison_inputs, "--output_dir", str(self.stage_dir(spec)),
                    "--seed", str(self.settings.seed)]
        for text in self.overrides[spec.name]:
            cmd += ["--set", text]
        cmd += list(spec.extra_args)
        if mode == "overwrite":
            cmd.append("--overwrite")
        elif mode == "resume":
            cmd.append(spec.stage.resume[1])
        return cmd


# ----------------------------------------------------------------------------------------------------------
# Skip rules

def _is_path(value: Any) -> bool:
    return isinstance(value, str) and bool(value) and not re.fullmatch(r"[0-9a-f]{64}", value)


@dataclass
class StageCheck:
    fresh: bool
    reasons: list[str]
    manifest: dict | None
    resumable: bool = False   # unfinished, but configuration, seed and inputs unchanged


def check_stage(stage_dir: Path, config: dict, seed: int) -> StageCheck:
    """Is the stage in stage_dir finished with this configuration and seed, on inputs that did not change?"""
    manifest = read_manifest(stage_dir)
    if manifest is None:
        if stage_dir.is_dir() and any(stage_dir.iterdir()):
            return StageCheck(False, ["folder has no readable manifest (interrupted?)"], None)
        return StageCheck(False, ["not run yet"], None)
    reasons: list[str] = []
    status = manifest.get("status")
    if status != "completed":
        reasons.append(f"manifest status '{status}' (interrupted or failed)")
    same = True
    if manifest.get("seed") != seed:
        reasons.append(f"seed {manifest.get('seed')} -> {seed}")
        same = False
    diff = config_diff(manifest.get("config"), config, added_defaults_differ=False)
    if diff:
        more = f" (+{len(diff) - 3} more)" if len(diff) > 3 else ""
        reasons.append("config changed: " + "; ".join(diff[:3]) + more)
        same = False
    for name, record in (manifest.get("inputs") or {}).items():
        path = Path(record.get("path", ""))
        if not path.exists():
            reasons.append(f"input {name} missing: {path}")
            same = False
        elif sha256_path(path) != record.get("sha256"):
            reasons.append(f"input {name} changed: {path}")
            same = False
    if status == "completed":
        for name, value in (manifest.get("outputs") or {}).items():
            if _is_path(value) and not Path(value).exists():
                reasons.append(f"output {name} missing: {value}")
    return StageCheck(not reasons, reasons, manifest, resumable=status != "completed" and same)


def comparison_changes(manifest: dict, config: dict) -> list[str]:
    """11 reads every completed evaluation it finds: a new (or vanished) one is a change of its inputs."""
    recorded = {Path(r["path"]).resolve() for name, r in (manifest.get("inputs") or {}).items()
                if name.endswith("/metrics") and r.get("path")}
    try:
        now = {path.resolve() for path in completed_metrics_files(config["inputs"])}
    except StageError:
        now = set()
    reasons = [f"new evaluation {path.parent.name}" for path in sorted(now - recorded)]
    return reasons + [f"evaluation {path.parent.name} gone" for path in sorted(recorded - now)]


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def dynamic_depends(manifest: dict | None, earlier: list[tuple[StageSpec, Path, dict | None]]) -> set[str]:
    """Earlier stages whose folder or recorded outputs hold one of this stage's recorded inputs."""
    if not manifest:
        return set()
    found = set()
    for record in (manifest.get("inputs") or {}).values():
        path = Path(record.get("path", "")).resolve()
        for spec, folder, upstream in earlier:
            outputs = [Path(v).resolve() for v in ((upstream or {}).get("outputs") or {}).values() if _is_path(v)]
            if _inside(path, folder.resolve()) or any(_inside(path, out) for out in outputs):
                found.add(spec.name)
    return found


@dataclass
class Decision:
    spec: StageSpec
    action: str                     # run | skip | error
    reasons: list[str]
    mode: str = "fresh"             # fresh | overwrite | resume (how it is run)
    command: list[str] = field(default_factory=list)
    depends: set[str] = field(default_factory=set)

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


def _has_files(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def decide(resolver: Resolver, spec: StageSpec, rerun_upstream: set[str], forced: bool,
           earlier: list[tuple[StageSpec, Path, dict | None]]) -> tuple[Decision, dict | None]:
    folder = resolver.stage_dir(spec)
    script = REPO_ROOT / spec.script
    if not script.is_file():
        return Decision(spec, "error", [f"script {spec.script} not found"]), None
    config = resolver.config_or_error(spec)
    if isinstance(config, Exception):
        return Decision(spec, "error", [str(config)]), None
    if _has_files(folder) and not is_stage_folder(folder, Path(spec.script).stem):
        return Decision(spec, "error", [f"{folder} holds files this project did not write there (no manifest.json "
                                        f"of {Path(spec.script).stem}); move them away"]), None
    check = check_stage(folder, config, resolver.settings.seed)
    if spec.key == "comparison" and check.manifest is not None:
        check.reasons += comparison_changes(check.manifest, config)
        check.fresh = not check.reasons
    if spec.stage.multi_process and check.manifest is not None:  # the processes change its results
        recorded = (check.manifest.get("metrics") or {}).get("processes")
        wanted = resolver.settings.processes
        if recorded is not None and wanted is not None and recorded != wanted:
            check.reasons.append(f"ran on {recorded} process(es), --launcher asks for {wanted}")
    depends = set(spec.depends) | dynamic_depends(check.manifest, earlier)
    upstream = sorted(depends & rerun_upstream)
    reasons = list(check.reasons)
    if check.manifest is not None:  # (a stage never run runs anyway)
        reasons += [f"upstream {name} re-runs" for name in upstream]
    if forced:
        reasons.insert(0, "--rerun")
    if not reasons:
        decision = Decision(spec, "skip", ["completed, same config and seed, inputs unchanged"], depends=depends)
    else:
        mode = "overwrite" if _has_files(folder) else "fresh"
        if (spec.stage.resume and check.resumable and not upstream and not forced
                and any(folder.glob(spec.stage.resume[0]))):
            mode = "resume"
            reasons.append("resuming from its last checkpoint")
        decision = Decision(spec, "run", reasons, mode, depends=depends)
    decision.command = resolver.command(spec, decision.mode)
    return decision, check.manifest


def plan_problems(resolver: Resolver, specs: list[StageSpec]) -> list[str]:
    """What stops a plan from running at all: missing scripts, config files that cannot be read or resolved, vLLM
    asked for where it is not installed (found now, not when the first stage that needs it starts)."""
    problems, need_vllm = [], []
    for spec in specs:
        if not (REPO_ROOT / spec.script).is_file():
            problems.append(f"{spec.name}: script {spec.script} not found")
            continue
        config = resolver.config_or_error(spec)
        if isinstance(config, Exception):
            problems.append(f"{spec.name}: {config}")
        elif config.get("generation", {}).get("engine") == "vllm" or config.get("algorithm", {}).get("use_vllm"):
            need_vllm.append(spec.name)
    if need_vllm and not vllm_engine.available():
        problems.append(f"{', '.join(need_vllm)}: generation.engine vllm / algorithm.use_vllm, and vLLM is not "
                        f"installed (install it with {vllm_engine.INSTALL_HINT}, or --set generation.engine=native "
                        f"--set algorithm.use_vllm=false)")
    return problems


def make_plan(resolver: Resolver, specs: list[StageSpec], rerun: set[str] = frozenset()) -> list[Decision]:
    """Decide every stage in order; a re-run propagates to everything that depends on it."""
    decisions, earlier, rerunning = [], [], set()
    for spec in specs:
        decision, manifest = decide(resolver, spec, rerunning, spec.name in rerun, earlier)
        if decision.action != "skip":
            rerunning.add(spec.name)
        decisions.append(decision)
        earlier.append((spec, resolver.stage_dir(spec), manifest))
    return decisions


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def format_plan(decisions: list[Decision], run_dir: Path, commands: bool = True) -> str:
    n_run = sum(d.action == "run" for d in decisions)
    lines = [f"plan for {run_dir}: {len(decisions)} stage(s), {n_run} to run, "
             f"{sum(d.action == 'skip' for d in decisions)} up to date"]
    width = max(len(d.spec.name) for d in decisions)
    for index, d in enumerate(decisions, 1):
        action = {"run": f"RUN ({d.mode})" if d.mode != "fresh" else "RUN", "skip": "skip",
                  "error": "ERROR"}[d.action]
        lines.append(f"  [{index:>2}/{len(decisions)}] {d.spec.name:<{width}}  {action:<15} {d.reason}")
        if d.command and commands:
            lines.append(f"           $ {shlex.join(d.command)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Running

def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the stage gets SIGTERM if the driver dies (even by kill -9), so no orphan keeps writing."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class StageProcess:
    exit_code: int
    peak_rss_mb: float | None  # the process's maximum resident set size (getrusage of the child)


def _wait(proc: subprocess.Popen) -> StageProcess:
    if not hasattr(os, "wait4"):
        return StageProcess(proc.wait(), None)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return StageProcess(proc.returncode, round(usage.ru_maxrss / 1024, 1))  # ru_maxrss is in KiB on Linux


def run_teed(command: list[str], log_path: Path, echo: Callable[[str], None]) -> StageProcess:
    """Run command, streaming its stdout+stderr to echo and to log_path; its exit code and peak memory."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if log_path.exists() and not is_driver_log(log_path):  # (refuse_foreign_run_root checked; this is a race)
        raise StageError(f"{log_path} is not a log this driver wrote; move it away")
    with open_no_follow(log_path) as log:
        log.write(f"# {now_iso()} $ {shlex.join(command)}\n".encode())
        log.flush()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                bufsize=0, env=env, preexec_fn=_die_with_parent if os.name == "posix" else None)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            while True:
                chunk = proc.stdout.read(65536)
                if not chunk:
                    break
                log.write(chunk)
                log.flush()
                echo(decoder.decode(chunk))
            echo(decoder.decode(b"", final=True))
            return _wait(proc)
        except BaseException:  # Ctrl-C / kill: let the stage record itself as failed, then make sure it is gone
            proc.send_signal(signal.SIGINT)  # (a second Ctrl-C at worst leaves its manifest 'running': re-run)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        finally:
            proc.stdout.close()


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    # progress bars rewrite their line with \r: keep the last state of each line
    cleaned = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return "\n".join(cleaned[-lines:])


class RunManifest:
    """outputs/<run_id>/run_manifest.json: every stage manifest with status, duration, ran or skipped, and for a
    stage run by this invocation its process's peak memory: RSS (the driver measures it) and, where the stage used
    CUDA, GPU (read from its manifest: utils.runs.peak_gpu_mib)."""

    def __init__(self, run_dir: Path, argv: list[str], methods: list[str], decisions: list[Decision]):
        self.path = run_dir / RUN_MANIFEST
        self.run_dir = run_dir
        previous = read_manifest_file(self.path)
        self.history = (previous or {}).get("invocations", [])[-19:]
        self.started = time.time()
        self.data = {
            "run_id": run_dir.name, "methods": methods or ["none"],
            "command": shlex.join([sys.executable, *argv]), "status": "running",
            "start_time": now_iso(), "end_time": None,
            "stages": [self._entry(d) for d in decisions],
        }

    def _entry(self, d: Decision) -> dict:
        folder = self.run_dir / d.spec.name
        return {"stage": d.spec.name, "script": d.spec.script, "folder": str(folder),
                "manifest": str(folder / "manifest.json"), "action": d.action if d.action != "run" else "pending",
                "reason": d.reason, "command": shlex.join(d.command), "status": None, "duration_s": None,
                "driver_wall_s": None, "cpu_s": None, "peak_rss_mb": None, "peak_gpu_mib": None, "log": None}

    def update(self, index: int, **fields: Any) -> None:
        self.data["stages"][index].update(fields)
        self.write()

    def write(self, status: str | None = None) -> None:
        if status:
            self.data["status"] = status
            self.data["end_time"] = now_iso()
        for entry in self.data["stages"]:
            manifest = read_manifest(Path(entry["folder"])) or {}
            entry["status"] = manifest.get("status")
            entry["duration_s"] = manifest.get("duration_s")
            if entry["log"]:  # run by this invocation (a skipped stage's figure would be an earlier run's)
                entry["peak_gpu_mib"] = peak_gpu_mib(manifest)
        wall = round(time.time() - self.started, 2)
        self.data["wall_time_s"] = wall
        self.data["stages_duration_s"] = round(sum(e["duration_s"] or 0 for e in self.data["stages"]), 2)
        ran = [e["stage"] for e in self.data["stages"] if e["action"] == "ran"]
        current = {"start_time": self.data["start_time"], "status": self.data["status"], "wall_time_s": wall,
                   "ran": ran}
        self.data["invocations"] = self.history + [current]
        write_json_atomic(self.path, self.data)


def read_manifest_file(path: Path) -> dict | None:
    try:
        data = read_json(path)
    except StageError:
        return None
    return data if isinstance(data, dict) else None


RUN_MANIFEST = "run_manifest.json"
DRIVER_LOGS = "driver_logs"
LOG_HEADER = re.compile(rb"# \d{4}-\d\d-\d\dT[0-9:+-]+ \$ ")  # the first line run_teed writes in every log


def is_driver_log(path: Path) -> bool:
    """A log run_teed wrote: a plain file (no link) that is empty (a kill before its first line) or starts with
    the driver's header line."""
    if path.is_symlink() or not path.is_file():
        return False
    with open(path, "rb") as handle:
        head = handle.read(64)
    return not head or bool(LOG_HEADER.match(head))


def is_run_manifest(path: Path) -> bool:
    data = None if path.is_symlink() else read_manifest_file(path)
    return isinstance(data, dict) and isinstance(data.get("stages"), list) and isinstance(data.get("invocations"),
                                                                                             list) and "run_id" in data


def refuse_foreign_run_root(run_dir: Path) -> None:
    """The folder rule for the driver's own files: it writes run_manifest.json, driver_logs/<stage>.log and
    .driver.lock in the run folder, and replaces one only when it provably wrote it; the run folder itself must
    not be, or lie inside, a stage's folder (which replacing that stage would delete)."""
    outer = read_manifest(run_dir) and run_dir or enclosing_stage(run_dir)
    if outer:
        raise StageError(f"{run_dir} is {'a' if outer == run_dir else 'inside a'} stage's folder ({outer}); choose "
                         f"another --run_id or paths.outputs_dir (nothing was changed)")
    manifest = run_dir / RUN_MANIFEST
    if (manifest.exists() or manifest.is_symlink()) and not is_run_manifest(manifest):
        raise StageError(f"{manifest} is not a run manifest this driver wrote; move it away or choose another "
                         f"--run_id (nothing was changed)")
    logs = run_dir / DRIVER_LOGS
    if logs.is_symlink() or (logs.exists() and not logs.is_dir()):
        raise StageError(f"{logs} is not a folder the driver can write its logs to (a file or a symbolic link); "
                         f"move it away (nothing was changed)")
    foreign = [p for p in sorted(logs.iterdir()) if not is_driver_log(p)] if logs.is_dir() else []
    if foreign:
        raise StageError(f"{logs} holds files this driver did not write ({foreign[0].name}"
                         f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); move them away or choose "
                         f"another --run_id (nothing was changed)")


def run_lock(run_dir: Path) -> FolderLock:
    """One driver per run at a time (an flock on .driver.lock, released by the kernel even after kill -9)."""
    return FolderLock(run_dir, run_dir / ".driver.lock", f"another 12_driver.py is running on {run_dir}")


def execute(resolver: Resolver, decisions: list[Decision], manifest: RunManifest,
            echo: Callable[[str], None], rerun: set[str] = frozenset()) -> int:
    """Run the plan in order; stop at the first failure. Returns the exit code."""
    started, ran = time.time(), set()
    total = len(decisions)
    earlier: list[tuple[StageSpec, Path, dict | None]] = []
    for index, decision in enumerate(decisions):
        spec = decision.spec
        tag = f"[{index + 1}/{total}] {spec.name}"
        if ran:  # an upstream stage ran: decide again from this stage's own state (hashes as they are now)
            planned = decision
            decision, _ = decide(resolver, spec, set(), spec.name in rerun, earlier)
            if decision.action == "skip" and planned.action == "run":
                decision.reasons = [f"{planned.reason}; re-checked: the inputs it reads are unchanged"]
            decisions[index] = decision
            manifest.data["stages"][index] = manifest._entry(decision)
        elapsed = format_duration(time.time() - started)
        if decision.action == "error":
            manifest.update(index, action="failed")
            manifest.write("failed")
            echo(f"{tag}: cannot run: {decision.reason}\n")
            return 1
        if decision.action == "skip":
            echo(f"{tag}: skip ({decision.reason}) [elapsed {elapsed}]\n")
            manifest.update(index, action="skipped")
            earlier.append((spec, resolver.stage_dir(spec), read_manifest(resolver.stage_dir(spec))))
            continue
        echo(f"\n{'=' * 100}\n{tag}: run ({decision.reason}) [elapsed {elapsed}]\n$ {shlex.join(decision.command)}\n"
             f"{'=' * 100}\n")
        log_path = resolver.run_root / DRIVER_LOGS / f"{spec.log_name}.log"
        manifest.update(index, action="running", log=str(log_path))
        t0, cpu0 = time.time(), children_cpu_s()
        try:
            process = run_teed(decision.command, log_path, echo)
            code = process.exit_code
        except KeyboardInterrupt:
            manifest.update(index, action="interrupted", driver_wall_s=round(time.time() - t0, 2))
            manifest.write("interrupted")
            echo(f"\n{tag}: interrupted; the next run of the driver picks up from here\n")
            return 130
        wall = round(time.time() - t0, 2)
        manifest.data["stages"][index]["cpu_s"] = round(children_cpu_s() - cpu0, 2)  # user + sys of the stage
        manifest.data["stages"][index]["peak_rss_mb"] = process.peak_rss_mb
        stage_manifest = read_manifest(resolver.stage_dir(spec)) or {}
        if code == 0 and stage_manifest.get("status") != "completed":
            code, problem = 1, f"exited 0 but {resolver.stage_dir(spec) / 'manifest.json'} is not completed"
        else:
            problem = f"exited with code {code}"
        if code != 0:
            manifest.update(index, action="failed", driver_wall_s=wall)
            manifest.write("failed")
            echo(f"\n{tag}: FAILED ({problem}) after {format_duration(wall)}; last lines of {log_path}:\n"
                 f"{'-' * 100}\n{log_tail(log_path)}\n{'-' * 100}\n"
                 f"stopped; fix the problem and run the same command again (finished stages are kept)\n")
            return 1
        ran.add(spec.name)
        earlier.append((spec, resolver.stage_dir(spec), stage_manifest))
        manifest.update(index, action="ran", driver_wall_s=wall)
        echo(f"{tag}: done in {format_duration(wall)} [elapsed {format_duration(time.time() - started)}]\n")
    manifest.write("completed")
    rows = [(e["stage"], e["action"], e["status"] or "-", e["driver_wall_s"], e.get("cpu_s"), e.get("peak_rss_mb"),
             e.get("peak_gpu_mib")) for e in manifest.data["stages"]]
    echo("\nsummary (wall time; CPU time, peak memory and peak GPU memory of the stage's process):\n" + "\n".join(
        f"  {stage:<28} {action:<8} {status:<10} {'' if wall is None else format_duration(wall)}"
        f"{'' if cpu is None else f'  cpu {format_duration(cpu)}'}{'' if rss is None else f'  peak {rss:.0f} MB'}"
        f"{'' if gpu is None else f'  gpu {gpu:.0f} MiB'}"
        for stage, action, status, wall, cpu, rss, gpu in rows) + "\n")
    if not ran:
        echo(f"nothing to do: all {total} stage(s) are up to date (completed, same config and seed, inputs "
             f"unchanged)\n")
    else:
        echo(f"ran {len(ran)} of {total} stage(s) in {format_duration(time.time() - started)}; "
             f"run manifest: {manifest.path}\n")
    return 0


# ----------------------------------------------------------------------------------------------------------
# Command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="12_driver.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True,
                        help=f"{', '.join(METHODS)}, all (those), none (SFT only), a variant "
                             f"({', '.join(VARIANTS)}: utils/stages.py), or a comma list (grpo,grpo_dr,dpo)")
    parser.add_argument("--run_id", default="run_001", help="run folder under outputs/ (default: run_001)")
    parser.add_argument("--config", default=DEFAULT_MODEL_CONFIG,
                        help=f"model config for every stage (default: {DEFAULT_MODEL_CONFIG})")
    parser.add_argument("--seed", type=int, default=42, help="seed passed to every stage (default: 42)")
    parser.add_argument("--quick_test", action="store_true", help="pass --quick_test to every stage")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="[STAGE.]KEY=VALUE",
                        help="config override for every stage that has KEY, or for STAGE only (repeatable)")
    parser.add_argument("--stage_config", action="append", default=[], metavar="STAGE=FILE",
                        help="the stage's --algo_config (repeatable)")
    parser.add_argument("--dry_run", action="store_true", help="print the plan (run/skip and why) and run nothing")
    parser.add_argument("--stages", default=None, metavar="LIST",
                        help="only these plan entries (comma list of stage names, numbers or keys)")
    parser.add_argument("--until", default=None, metavar="STAGE", help="stop after this stage")
    parser.add_argument("--rerun", default=None, metavar="LIST",
                        help="re-run these stages even when up to date (what reads their outputs re-runs if "
                             "they changed)")
    parser.add_argument("--no_base_eval", action="store_true", help="do not evaluate the untrained base model")
    parser.add_argument("--launcher", default=None, metavar="COMMAND",
                        help="run the stages that support several processes (utils/stages.py: multi_process) "
                             "under this launcher: \"accelerate launch --num_processes 8\" on GPUs, \"torchrun "
                             "--nproc_per_node 2\" on a CPU (accelerate launch --cpu starts one process)")
    parser.add_argument("--preset", default=None, metavar="NAME",
                        help="configs/presets/NAME.yaml (or a YAML path): --set entries applied before the command "
                             "line's; `cpu` is the study on a 2-core CPU")
    return parser


PRESETS_DIR = REPO_ROOT / "configs" / "presets"


def preset_overrides(name: str) -> tuple[Path, list[str]]:
    """A preset's --set entries: a YAML file whose `set` is a list of [STAGE.]KEY=VALUE strings."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))) or "none"
        raise UsageError(f"--preset {name}: {path} not found (presets: {known})")
    try:
        data = load_yaml(path)
    except ConfigError as err:
        raise UsageError(f"--preset {name}: {err}") from None
    entries = data.get("set") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, str) and "=" in e for e in entries):
        raise UsageError(f"--preset {name}: {path} needs `set:` as a list of [STAGE.]KEY=VALUE strings")
    return path, entries


def main(argv: list[str] | None = None, echo: Callable[[str], None] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)

    def default_echo(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
    echo = echo or default_echo

    methods = parse_methods(args.method)
    preset_path, preset = preset_overrides(args.preset) if args.preset else (None, [])
    settings = DriverSettings(args.config, args.run_id, args.seed, args.quick_test, args.overrides,
                              args.stage_config, preset, args.launcher)
    try:
        settings.processes
    except ConfigError as err:  # its accelerate --config_file
        raise UsageError(f"--launcher {args.launcher!r}: {err}") from None
    except (ValueError, IndexError):
        raise UsageError(f"--launcher {args.launcher!r}: the process count needs a whole number") from None
    full_plan, resolver = plan_and_resolver(methods, settings, base_eval=not args.no_base_eval)
    specs = select_stages(full_plan, args.stages, args.until)
    rerun = {spec.name for sel in (args.rerun or "").split(",") if sel.strip()
             for spec in resolve_selector(full_plan, sel, "--rerun")}
    if args.dry_run:
        decisions = make_plan(resolver, specs, rerun)
        echo(format_plan(decisions, resolver.run_root) + "\ndry run: nothing was run\n")
        return 1 if any(d.action == "error" for d in decisions) else 0
    problems = plan_problems(resolver, specs)
    if problems:
        raise UsageError("cannot run this plan: " + "; ".join(problems) + " (--dry_run shows the whole plan)")
    def terminate(signum, frame):  # `kill PID`: stop the stage and record it, like Ctrl-C
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        refuse_foreign_run_root(resolver.run_root)  # before the lock file is made in it
        with run_lock(resolver.run_root):
            refuse_foreign_run_root(resolver.run_root)
            decisions = make_plan(resolver, specs, rerun)
            echo(format_plan(decisions, resolver.run_root, commands=False) + "\n")
            manifest = RunManifest(resolver.run_root, ["12_driver.py", *argv], methods, decisions)
            if preset_path:
                manifest.data["preset"] = {"name": args.preset, "file": str(preset_path), "set": preset}
            if args.launcher:
                manifest.data["launcher"] = {"command": args.launcher, "processes": settings.processes,
                                             "stages": [d.spec.name for d in decisions if d.spec.stage.multi_process]}
            manifest.write()
            return execute(resolver, decisions, manifest, echo, rerun)
    finally:
        signal.signal(signal.SIGTERM, previous)
